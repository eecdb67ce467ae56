//! Search over HTTP and NATS.
//!
//! - `GET /v1/audit?device=&worker=&request=&trace=&stage=&outcome=&since=&until=&limit=&cursor=`
//! - `GET /v1/devices/<id>/timeline?since=&until=&limit=&cursor=` (default: the last 7 days)
//! - NATS service `devsync-audit`, endpoint `devsync.api.audit.search`: a JSON object of the
//!   same parameters in, the same JSON page out.
//!
//! Answers are `{"events": [...], "next_cursor": "..."}` in time order; a bad parameter is a
//! 400 (or a service error with code 400) whose message names it.

use std::collections::BTreeMap;

use async_nats::service::ServiceExt;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use deadpool_postgres::Pool;
use devsync_runtime::Shutdown;
use devsync_types::names;
use futures::StreamExt;
use serde_json::json;

use crate::query::{self, QueryError};

/// The NATS subject prefix of the search endpoint.
pub const NATS_GROUP: &str = "devsync.api.audit";

/// The HTTP routes.
pub fn router(pool: Pool) -> Router {
    Router::new()
        .route("/v1/audit", get(search))
        .route("/v1/devices/{id}/timeline", get(timeline))
        .with_state(pool)
}

/// Why a search failed.
#[derive(Debug)]
pub enum SearchError {
    /// A bad parameter (400).
    Query(QueryError),
    /// The database failed (503).
    Store(String),
}

impl IntoResponse for SearchError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::Query(error) => (StatusCode::BAD_REQUEST, error.to_string()),
            Self::Store(error) => (StatusCode::SERVICE_UNAVAILABLE, error),
        };
        (status, Json(json!({"error": message}))).into_response()
    }
}

/// Runs a search from raw parameters.
pub async fn run(
    pool: &Pool,
    params: &BTreeMap<String, String>,
) -> Result<devsync_store::audit::Page, SearchError> {
    let query = query::parse(params, Utc::now()).map_err(SearchError::Query)?;
    let client = pool
        .get()
        .await
        .map_err(|e| SearchError::Store(e.to_string()))?;
    devsync_store::audit::search(&client, &query)
        .await
        .map_err(|e| SearchError::Store(e.to_string()))
}

async fn search(
    State(pool): State<Pool>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Result<Json<devsync_store::audit::Page>, SearchError> {
    run(&pool, &params).await.map(Json)
}

async fn timeline(
    State(pool): State<Pool>,
    Path(id): Path<String>,
    Query(mut params): Query<BTreeMap<String, String>>,
) -> Result<Json<devsync_store::audit::Page>, SearchError> {
    if params.contains_key("device") {
        return Err(SearchError::Query(QueryError(
            "parameter device: the device is in the path".into(),
        )));
    }
    params.insert("device".into(), id);
    params.entry("since".into()).or_insert_with(|| "7d".into());
    run(&pool, &params).await.map(Json)
}

/// Serves the NATS search endpoint until `shutdown`.
pub async fn serve_nats(client: async_nats::Client, pool: Pool, shutdown: Shutdown) {
    let service = match client
        .service_builder()
        .description("devsync audit search")
        .start(names::AUDIT_SEARCH_SERVICE, env!("CARGO_PKG_VERSION"))
        .await
    {
        Ok(service) => service,
        Err(error) => {
            tracing::error!(%error, "cannot start the audit search service");
            return;
        }
    };
    let mut endpoint = match service.group(NATS_GROUP).endpoint("search").await {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::error!(%error, "cannot add the audit search endpoint");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = endpoint.next() => request,
        };
        let Some(request) = request else { break };
        let params: Result<BTreeMap<String, String>, _> =
            serde_json::from_slice(&request.message.payload);
        let answer = match params {
            Err(error) => Err(async_nats::service::error::Error {
                code: 400,
                status: format!("the request must be a JSON object of strings: {error}"),
            }),
            Ok(params) => match run(&pool, &params).await {
                Ok(page) => Ok(serde_json::to_vec(&page).unwrap_or_default().into()),
                Err(SearchError::Query(error)) => Err(async_nats::service::error::Error {
                    code: 400,
                    status: error.to_string(),
                }),
                Err(SearchError::Store(error)) => Err(async_nats::service::error::Error {
                    code: 503,
                    status: error,
                }),
            },
        };
        if let Err(error) = request.respond(answer).await {
            tracing::warn!(%error, "cannot answer audit search");
        }
    }
    let _ = service.stop().await;
}
