//! The gateway: routes `{port}-{sessionID}-{clientID}.{domain}` to a session's envd, proxying bytes
//! (HTTP and websocket upgrades). It does not parse JSON-RPC.
