//! All integration tests, in one binary to link once.

mod support;

mod admin;
mod binary;
mod custody;
mod fabric;
mod faults;
mod hardening;
mod id_token;
mod idp_answers;
mod idp_variants;
mod keepalive;
mod login_flow;
mod metrics;
mod names;
mod narrow;
mod operations;
mod outages;
mod pages;
mod refresh;
mod refresh_safety;
mod rejections;
mod security;
mod service;
mod spawn;
mod store_backends;
