//! `flowgate`: the lifecycle of short-lived MLflow instances for job results.
//!
//! Reading order: [`instance`] (the model and its validation) → [`service`]
//! (the rules: owners, dedupe, quotas, TTLs, events) → [`backend`] (what a
//! backend does) → [`kube`] (the Kubernetes backend; [`kube::objects`]
//! builds every object) → [`operator`] (the `MlflowInstance` custom resource,
//! its controller and `--backend operator`) → [`cli`] (the command line).

pub mod access;
pub mod api;
pub mod backend;
pub mod cli;
pub mod credentials;
pub mod error;
pub mod events;
pub mod hosts;
pub mod instance;
pub mod kube;
pub mod labels;
pub mod ledger;
pub mod local;
pub mod operator;
pub mod output;
pub mod serve;
pub mod service;
pub mod settings;
pub mod waking;

pub use error::{Error, Result};
