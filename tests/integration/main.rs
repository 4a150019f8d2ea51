//! All integration tests, in one binary to link once.

mod support;

mod binary;
mod faults;
mod id_token;
mod login_flow;
mod pages;
mod refresh;
mod rejections;
mod security;
mod service;
mod spawn;
mod store_backends;
