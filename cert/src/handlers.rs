//! Thin handlers: parse the body, call the service, shape the answer with the route's status.

use cert_api::{
    CertResponse, CreateCertRequest, DraftCertRequest, DraftCertResponse, ImportCertRequest,
};
use http::{Method, StatusCode};
use http_common::{empty_response, json_response, Request, Response};

use crate::error::CertError;
use crate::service::{CertService, IssuerRequest};

/// `POST /certificates`: 201 with the new certificate and the issuer chain.
pub(crate) async fn create_cert(
    service: &CertService,
    request: &Request,
) -> Result<Response, CertError> {
    let body: CreateCertRequest = request.json()?;
    let issuer = body.issuer.map(|issuer| IssuerRequest {
        cert_id: issuer.cert_id,
        private_key_handle: issuer.private_key_handle,
    });
    let pem = service
        .issue_from_csr(request.caller.uid, &body.cert_id, &body.csr, issuer)
        .await?;
    Ok(json_response(StatusCode::CREATED, &CertResponse { pem }))
}

/// `PUT /certificates/{certId}`: 201 echoing the stored PEM.
pub(crate) async fn import_cert(
    service: &CertService,
    request: &Request,
    id: &str,
) -> Result<Response, CertError> {
    let body: ImportCertRequest = request.json()?;
    let pem = service.import(request.caller.uid, id, &body.pem).await?;
    Ok(json_response(StatusCode::CREATED, &CertResponse { pem }))
}

/// `GET /certificates/{certId}`.
pub(crate) async fn get_cert(service: &CertService, id: &str) -> Result<Response, CertError> {
    let pem = service.get(id).await?;
    Ok(json_response(StatusCode::OK, &CertResponse { pem }))
}

/// `DELETE /certificates/{certId}`: 204, also when absent.
pub(crate) async fn delete_cert(
    service: &CertService,
    request: &Request,
    id: &str,
) -> Result<Response, CertError> {
    service.delete(request.caller.uid, id).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

/// The draft routes take the ID from the body or the `certid` query parameter; both given must
/// agree.
fn draft_id(request: &Request, body_value: Option<String>) -> Result<String, CertError> {
    match (body_value, request.query_param("certid")) {
        (Some(body), Some(query)) if body != query => Err(CertError::invalid(
            "certid",
            "body and query parameter disagree",
        )),
        (Some(value), _) | (None, Some(value)) => Ok(value),
        (None, None) => Err(CertError::invalid("certid", "is required")),
    }
}

/// Draft `GET|POST|PUT /certstore/cert`: a body with `pem` is an import (200); otherwise POST
/// creates (201, or 200 when it existed) and GET loads (200). PUT requires `pem`.
pub(crate) async fn draft_cert(
    service: &CertService,
    request: &Request,
) -> Result<Response, CertError> {
    let body: DraftCertRequest = request.optional_json()?.unwrap_or_default();
    let id = draft_id(request, body.certid)?;
    let uid = request.caller.uid;
    let (status, pem) = match (&request.method, body.pem) {
        (_, Some(pem)) => (StatusCode::OK, service.import(uid, &id, &pem).await?),
        (&Method::POST, None) => {
            let (pem, created) = service.draft_create(uid, &id).await?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, pem)
        }
        (&Method::GET, None) => (StatusCode::OK, service.get(&id).await?),
        (_, None) => return Err(CertError::invalid("pem", "is required")),
    };
    Ok(json_response(status, &DraftCertResponse { pem }))
}
