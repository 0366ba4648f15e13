//! `POST /system/reload`: read the config file again and apply it to the functions, through
//! the [`Reload`] seam (the gateway holds one; `reload.rs` at the top of the crate implements
//! it, since applying a config starts providers and autoscalers).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use serde::Serialize;

use super::{authorize, json, Admin};
use crate::body::ResponseBody;
use crate::error::GatewayError;
use crate::provider::BoxFuture;

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    /// Functions the new config adds, by name.
    pub added: Vec<String>,
    /// Functions whose settings changed (replaced: new requests go to the new settings).
    pub changed: Vec<String>,
    /// Functions the new config no longer has.
    pub removed: Vec<String>,
    /// Functions left as they were.
    pub unchanged: usize,
    /// Keys that differ in the new file but cannot change while the gateway runs (`[gateway]`
    /// settings): still the running values until a restart.
    pub not_applied: Vec<String>,
}

/// Reads the config file again and applies it.
pub trait Reload: Send + Sync {
    /// Applies the config file as it is now. `Err` is the one-line reason it was refused (the
    /// line `sluicegate check-config` prints); the running config then stays.
    fn reload(&self) -> BoxFuture<'_, Result<ReloadReport, String>>;
}

/// `POST /system/reload`: `200` with the [`ReloadReport`], or `400` with the config error.
pub async fn reload<B>(
    admin: Admin<'_>,
    req: &Request<B>,
    reloader: Option<&Arc<dyn Reload>>,
) -> Result<Response<ResponseBody>, GatewayError> {
    authorize(admin, req)?;
    let reloader = reloader.ok_or_else(|| {
        GatewayError::Internal("this gateway was started without a config file to reload".into())
    })?;
    let report = reloader
        .reload()
        .await
        .map_err(GatewayError::InvalidConfig)?;
    let mut resp = json(&report);
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}
