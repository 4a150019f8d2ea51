//! The JSON API: tokens for code running in a notebook ([`notebook`]),
//! narrower tokens for hub services by delegation ([`delegation`]), the
//! hub's spawn hook ([`spawn`]) and the OpenAPI document that describes
//! both ([`openapi`]). The admin's JSON is in [`crate::admin::api`].

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

pub mod delegation;
pub mod notebook;
pub mod openapi;
pub mod spawn;

/// A JSON answer no cache may keep: every answer here carries tokens or
/// belongs to one user.
fn no_store(body: Value) -> Response {
    crate::no_store(Json(body).into_response())
}
