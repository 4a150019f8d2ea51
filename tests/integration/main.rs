//! All integration tests, in one binary to link once.

mod support;

mod id_token;
mod login_flow;
mod rejections;
mod service;
