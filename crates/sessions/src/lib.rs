//! Session lifecycle: create (from the warm pool or fresh), refresh, delete, expiry on a timer
//! queue, edit sessions and restart recovery. The one owner of session state.
