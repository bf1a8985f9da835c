//! Ready-made storage settings per apalis backend.

pub mod memory;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// The queue webhook jobs live in. apalis would otherwise name the queue after the Rust type,
/// which changes when the type moves.
pub const QUEUE: &str = "apalis-webhooks";
