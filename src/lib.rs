//! logit-lens: what a vision-language model "thinks" at every layer.
//!
//! Data flows one way: request → [`preprocess`] → [`engine`] (a [`models`] forward pass with the
//! [`lens`] as observer) → [`api`] response.

pub mod api;
pub mod cli;
pub mod engine;
pub mod error;
pub mod lens;
pub mod models;
pub mod preprocess;
pub mod report;
pub mod server;

pub use error::{Error, Result};
