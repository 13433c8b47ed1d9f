//! Maps `async-nats` errors onto the core [`Error`]: connection trouble, timeouts and
//! JetStream's "temporarily unavailable" answers are retryable; configuration mistakes
//! are not.

use std::fmt::Display;

use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::ErrorCode;
use marmot_core::Error;

/// JetStream answers with HTTP-like code 503 while it cannot serve a request yet (no
/// meta leader, stream leader election, not enough peers online).
const UNAVAILABLE: usize = 503;

/// A retryable transport error about `what`.
pub(crate) fn retryable(what: impl Display, err: impl Display) -> Error {
    Error::Transport { message: format!("{what}: {err}"), retryable: true }
}

/// A transport error about `what` that retrying will not fix.
pub(crate) fn permanent(what: impl Display, err: impl Display) -> Error {
    Error::Transport { message: format!("{what}: {err}"), retryable: false }
}

/// Whether a JetStream API error is one the server gives while it is still starting,
/// electing leaders or waiting for cluster peers to join (a cluster booting node by node
/// has too few peers for a replicated stream at first).
pub(crate) fn api_error_is_transient(err: &async_nats::jetstream::Error) -> bool {
    err.code() == UNAVAILABLE
        || err.error_code() == ErrorCode::CLUSTER_NO_PEERS
        || err.error_code() == ErrorCode::CLUSTER_NOT_AVAILABLE
}

pub(crate) fn publish(subject: &str, err: PublishError) -> Error {
    let what = format!("publish to {subject}");
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => permanent(what, err),
        // StreamNotFound is "no responders": also seen while a stream leader is elected.
        _ => retryable(what, err),
    }
}

/// Whether a publish failed because its stream has no leader right now: nothing listens on
/// the subject ("no responders") while a leader is elected, or JetStream answers 503.
pub(crate) fn is_leaderless(err: &PublishError) -> bool {
    matches!(err.kind(), PublishErrorKind::StreamNotFound)
        || std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(api_error_is_transient)
}

/// Whether JetStream refused a publish because an entry with the same id is still being
/// stored (clustered streams, 2.11+): the caller waits and asks again.
pub(crate) fn is_duplicate_in_flight(err: &PublishError) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|e| e.error_code() == ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
}

/// `None` when the stream does not exist.
pub(crate) fn get_stream(stream: &str, err: GetStreamError) -> Option<Error> {
    let what = format!("stream info of {stream}");
    match err.kind() {
        GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => None,
        GetStreamErrorKind::JetStream(e) if !api_error_is_transient(&e) => Some(permanent(what, e)),
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => Some(permanent(what, err)),
        _ => Some(retryable(what, err)),
    }
}

/// Maps a failed create or update (`action`) of `stream`.
pub(crate) fn change_stream(action: &str, stream: &str, err: CreateStreamError) -> Error {
    let what = format!("{action} stream {stream}");
    match err.kind() {
        CreateStreamErrorKind::JetStream(e) if !api_error_is_transient(&e) => permanent(what, e),
        CreateStreamErrorKind::EmptyStreamName
        | CreateStreamErrorKind::InvalidStreamName
        | CreateStreamErrorKind::DomainAndExternalSet => permanent(what, err),
        _ => retryable(what, err),
    }
}

/// Whether stream creation failed because another node created it first.
pub(crate) fn is_stream_name_taken(err: &CreateStreamError) -> bool {
    matches!(err.kind(), CreateStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NAME_EXIST)
}
