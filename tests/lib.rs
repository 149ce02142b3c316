//! Workspace-wide test crate. Its tests (`architecture.rs`) check the invariants that
//! ARCHITECTURE.md states, over `cargo metadata` and the source tree.
