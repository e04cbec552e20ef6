//! `flowgate`: the lifecycle of short-lived MLflow instances for job results.
//!
//! Reading order: [`instance`] (the model and its validation) → [`backend`]
//! (the operations) → [`kube`] (the Kubernetes backend; [`kube::objects`]
//! builds every object) → [`cli`] (the command line).

pub mod backend;
pub mod cli;
pub mod error;
pub mod instance;
pub mod kube;
pub mod labels;
pub mod output;
pub mod settings;

pub use error::{Error, Result};
