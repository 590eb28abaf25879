//! `ListSessions` page tokens: where the previous page ended ("machine-uuid/session-id") and a
//! short mark of the filters it was listed with, so that a token reused with other filters is
//! refused rather than answered with a page of something else (or an empty one).

use crate::error::ApiError;
use tsbroker_common::ValidationError;
use tsbroker_common::proto::v1 as pb;
use uuid::Uuid;

/// Namespace of the filters' mark (a UUIDv5 of them, of which the token keeps 8 hex digits).
const FILTERS_NAMESPACE: Uuid = Uuid::from_u128(0x5e55_10f5_1157_4c0e_9a6e_7061_6765_7321);

/// The token for the page after the one that ended at `machine`'s session `session_id`.
pub fn next(machine: Uuid, session_id: i64, request: &pb::ListSessionsRequest) -> String {
    format!("{machine}/{session_id}/{}", filters_mark(request))
}

/// Where the page asked for by `request.page_token` starts after (`None`: the first page).
pub fn after(request: &pb::ListSessionsRequest) -> Result<Option<(Uuid, i64)>, ApiError> {
    let token = &request.page_token;
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ValidationError::new("page_token", "not a token from a previous page");
    let mut parts = token.splitn(3, '/');
    let (Some(machine), Some(session), Some(mark)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid().into());
    };
    let machine = Uuid::parse_str(machine).map_err(|_| invalid())?;
    // Session ids are the agents' (32-bit, unsigned); the mark is 8 hex digits.
    let session = session.parse::<u32>().map_err(|_| invalid())?;
    let is_mark = mark.len() == 8 && mark.bytes().all(|byte| byte.is_ascii_hexdigit());
    if !is_mark {
        return Err(invalid().into());
    }
    if mark != filters_mark(request) {
        return Err(ValidationError::new(
            "page_token",
            "from a listing with other filters: ask again without a token",
        )
        .into());
    }
    Ok(Some((machine, i64::from(session))))
}

/// 8 hex digits standing for the filters (not the page size, which may change between pages).
fn filters_mark(request: &pb::ListSessionsRequest) -> String {
    let filters = format!(
        "{}\n{}\n{}\n{}\n{}",
        request.farm,
        request.machine_id.to_ascii_lowercase(),
        request.machine_name.to_ascii_lowercase(),
        tsbroker_common::model::user_key(&request.user_name),
        request.state
    );
    let mark = Uuid::new_v5(&FILTERS_NAMESPACE, filters.as_bytes());
    mark.simple().to_string()[..8].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_mark(token: &str) -> &str {
        token.rsplit('/').next().unwrap()
    }

    #[test]
    fn tokens_round_trip_under_the_same_filters_only() {
        let request = |farm: &str, page_token: String| pb::ListSessionsRequest {
            farm: farm.into(),
            page_token,
            page_size: 10,
            ..Default::default()
        };
        let id = Uuid::new_v4();
        let token = next(id, 7, &request("a", String::new()));
        assert_eq!(after(&request("a", token.clone())).unwrap(), Some((id, 7)));
        let other_size = pb::ListSessionsRequest {
            page_size: 50,
            ..request("a", token.clone())
        };
        assert_eq!(after(&other_size).unwrap(), Some((id, 7)));
        assert!(after(&request("b", token)).is_err());
        assert!(after(&request("a", "garbage".into())).is_err());
        assert!(after(&request("a", format!("{id}/7"))).is_err());
        // Altered tokens are not tokens, whatever their filters.
        let first = next(id, 7, &request("a", String::new()));
        let mark = token_mark(&first);
        for altered in [
            format!("{id}/-1/{mark}"),
            format!("{id}/99999999999/{mark}"),
            format!("{id}/7/{mark}/extra"),
            format!("{id}/7/"),
        ] {
            let refused = after(&request("a", altered.clone())).unwrap_err();
            assert!(
                refused
                    .to_string()
                    .contains("not a token from a previous page"),
                "{altered}: {refused}"
            );
        }
        assert_eq!(after(&request("a", String::new())).unwrap(), None);
    }
}
