//! Persistent state of one burrow node: teams, hashed API keys, sessions and the node identity,
//! in one SQLite file (WAL). Owns the schema and its migrations; knows nothing of sandboxes or HTTP.
