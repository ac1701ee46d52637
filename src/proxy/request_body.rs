//! The request body's checks before the upstream request, after every request phase: the
//! `client_max_body_size` in effect (the node's, or the one a plugin set for this request) on a
//! declared length, and `proxy_request_buffering` when a plugin turned it on.

use http::StatusCode;
use http_body::Body;

use crate::body::{ClientBodyFault, RequestBody};
use crate::plugin::ctx::Ctx;
use crate::plugin::LocalResponse;

/// Refuses a body declared larger than the limit (413, as nginx, with the body drained so the
/// connection can carry the next request), and reads the whole body when buffering is on.
pub(super) async fn prepare(ctx: &mut Ctx) -> Result<(), Box<LocalResponse>> {
    let limit = ctx.client.body_limit();
    // Only the client's own body: one a plugin read was checked then, and one a plugin set is
    // not the client's.
    let declared = match &ctx.body {
        RequestBody::Stream(b) => b.size_hint().exact(),
        _ => None,
    };
    if let (Some(max), Some(len)) = (limit, declared) {
        if len > max {
            if let RequestBody::Stream(incoming) = std::mem::take(&mut ctx.body) {
                crate::body::drain(incoming).await;
            }
            return Err(Box::new(fault_response(ClientBodyFault::TooLarge)));
        }
    }
    let streaming = matches!(&ctx.body, RequestBody::Stream(b) if !b.is_end_stream());
    if ctx.client.request_buffering && streaming {
        if let Err(e) = ctx.body.read_all(limit.unwrap_or(u64::MAX)).await {
            let fault = e.client_fault().unwrap_or(ClientBodyFault::Incomplete);
            fault.log(ctx.route_id(), &ctx.remote_addr, &e);
            return Err(Box::new(fault_response(fault)));
        }
    }
    Ok(())
}

/// nginx's answer to a client's bad body.
pub(crate) fn fault_response(fault: ClientBodyFault) -> LocalResponse {
    let text = match fault.status() {
        StatusCode::PAYLOAD_TOO_LARGE => "413 Request Entity Too Large",
        _ => "400 Bad Request",
    };
    LocalResponse::error(fault.status(), text)
}
