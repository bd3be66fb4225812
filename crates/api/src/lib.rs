//! The E2B session-era REST API: thin axum handlers that authenticate, validate and map
//! `sessions` results to the exact wire shapes. No business logic.
