//! The workspace-wide test crate.
//!
//! - As a library it is the one test harness the daemons' own tests share (a dev-dependency):
//!   [`daemon::Daemon`] runs a real daemon binary in a temporary folder, [`softhsm::SoftHsm`]
//!   makes a private SoftHSM2 token, [`swtpm::Swtpm`] a private software TPM, [`fuzz`] turns a route table into fuzzed requests.
//! - Its tests check the invariants ARCHITECTURE.md states (`architecture.rs`) and run the
//!   quickstart end to end (`quickstart.rs`).

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)] // A test harness: failures are panics.

#[path = "harness/daemon.rs"]
pub mod daemon;
#[path = "harness/fuzz.rs"]
pub mod fuzz;
#[path = "harness/softhsm.rs"]
pub mod softhsm;
#[path = "harness/swtpm.rs"]
pub mod swtpm;

pub use daemon::{sibling_binary, Daemon};
pub use softhsm::SoftHsm;
pub use swtpm::Swtpm;
