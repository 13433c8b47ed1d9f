//! The shard streams: the configuration Marmot wants for each, creating missing streams,
//! comparing existing ones with it (updating them only when asked to), and counting their
//! leader elections.
//!
//! Tolerates: several nodes creating the same stream at once (the loser adopts the
//! winner's stream), a JetStream that is still electing leaders (retryable errors), no
//! permission to read JetStream's advisories (no elections are counted then).
//! Reports: a stream whose settings differ, naming the stream and each setting.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use futures::StreamExt;
use marmot_core::{Error, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use super::connect::Counter;
use super::errors;
use super::options::NatsOptions;

/// Subject prefix of the advisories JetStream publishes when a stream elected a leader; the
/// stream's name is the last token.
const LEADER_ELECTED_ADVISORY: &str = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED";

/// Counts the leader elections of each shard stream of `opts` (indexed by shard), as
/// JetStream announces them, in a task that runs until it is aborted or the client closes.
/// A new leader means the old one is gone (or stepped down), with the acknowledgements it
/// still owed.
pub(crate) async fn count_leader_elections(
    client: &async_nats::Client,
    opts: &NatsOptions,
) -> Result<(Vec<Counter>, JoinHandle<()>)> {
    let mut advisories = client
        .subscribe(format!("{LEADER_ELECTED_ADVISORY}.*"))
        .await
        .map_err(|e| errors::retryable("subscribe to stream leader advisories", e))?;
    let (counters, elections): (BTreeMap<String, watch::Sender<u64>>, Vec<Counter>) = (0..opts.shards)
        .map(|shard| {
            let (counter, elections) = watch::channel(0u64);
            ((opts.stream_name(shard), counter), elections)
        })
        .unzip();
    let task = tokio::spawn(async move {
        while let Some(advisory) = advisories.next().await {
            let stream = advisory.subject.as_str().rsplit('.').next().unwrap_or_default();
            if let Some(counter) = counters.get(stream) {
                counter.send_modify(|n| *n += 1);
                info!(stream, "stream elected a new leader");
            }
        }
    });
    Ok((elections, task))
}

/// The configuration of the stream for `shard`.
pub(crate) fn desired_config(opts: &NatsOptions, shard: u32) -> Config {
    Config {
        name: opts.stream_name(shard),
        subjects: vec![opts.subject(shard)],
        storage: StorageType::File,
        num_replicas: opts.replicas,
        max_messages: opts.max_entries as i64,
        discard: DiscardPolicy::Old,
        retention: RetentionPolicy::Limits,
        duplicate_window: opts.duplicate_window,
        description: Some("Marmot change log".to_string()),
        ..Config::default()
    }
}

/// One setting that differs between an existing stream and the wanted configuration.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Difference {
    pub setting: &'static str,
    pub found: String,
    pub wanted: String,
}

/// The settings Marmot relies on, where `found` differs from `wanted`.
pub(crate) fn differences(found: &Config, wanted: &Config) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut check = |setting, f: String, w: String| {
        if f != w {
            out.push(Difference { setting, found: f, wanted: w });
        }
    };
    check("subjects", format!("{:?}", found.subjects), format!("{:?}", wanted.subjects));
    check("storage", format!("{:?}", found.storage), format!("{:?}", wanted.storage));
    check("replicas", found.num_replicas.to_string(), wanted.num_replicas.to_string());
    check("max_msgs", found.max_messages.to_string(), wanted.max_messages.to_string());
    check("discard", format!("{:?}", found.discard), format!("{:?}", wanted.discard));
    check("retention", format!("{:?}", found.retention), format!("{:?}", wanted.retention));
    check("duplicate_window", format!("{:?}", found.duplicate_window), format!("{:?}", wanted.duplicate_window));
    out
}

/// `existing` with Marmot's settings from `wanted` applied and everything else kept.
fn merged(existing: &Config, wanted: &Config) -> Config {
    Config {
        subjects: wanted.subjects.clone(),
        storage: wanted.storage,
        num_replicas: wanted.num_replicas,
        max_messages: wanted.max_messages,
        discard: wanted.discard,
        retention: wanted.retention,
        duplicate_window: wanted.duplicate_window,
        ..existing.clone()
    }
}

fn describe(diffs: &[Difference]) -> String {
    diffs
        .iter()
        .map(|d| format!("{} is {} (configured: {})", d.setting, d.found, d.wanted))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the stream `wanted` if missing; checks (and, with `update_existing`, updates)
/// it otherwise. Errors are retryable when JetStream is not ready yet.
pub(crate) async fn ensure(js: &Context, wanted: &Config, update_existing: bool) -> Result<()> {
    let name = wanted.name.as_str();
    let existing = match js.get_stream(name).await {
        Ok(stream) => stream.cached_info().config.clone(),
        Err(err) => {
            if let Some(e) = errors::get_stream(name, err) {
                return Err(e);
            }
            match js.create_stream(wanted.clone()).await {
                Ok(_) => {
                    info!(
                        stream = name,
                        replicas = wanted.num_replicas,
                        max_msgs = wanted.max_messages,
                        "created stream"
                    );
                    return Ok(());
                }
                // Another node created it between our lookup and our create: check theirs.
                Err(e) if errors::is_stream_name_taken(&e) => js
                    .get_stream(name)
                    .await
                    .map_err(|e| errors::get_stream(name, e).unwrap_or_else(|| vanished(name)))?
                    .cached_info()
                    .config
                    .clone(),
                Err(e) => return Err(errors::change_stream("create", name, e)),
            }
        }
    };
    let diffs = differences(&existing, wanted);
    if diffs.is_empty() {
        return Ok(());
    }
    if !update_existing {
        return Err(Error::Transport {
            message: format!(
                "stream {name} exists with different settings: {}; set \
                 replication_log.update_existing = true to update it",
                describe(&diffs)
            ),
            retryable: false,
        });
    }
    js.update_stream(merged(&existing, wanted)).await.map_err(|e| errors::change_stream("update", name, e))?;
    info!(stream = name, changes = %describe(&diffs), "updated stream settings");
    Ok(())
}

fn vanished(name: &str) -> Error {
    errors::retryable(format!("stream {name}"), "deleted while it was being created")
}

/// The wait for the answer to one of the first attempts to make sure a stream exists.
const ENSURE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Retries a retryable stream operation, for use while JetStream starts up.
pub(crate) async fn ensure_with_retry(
    js: &Context,
    wanted: &Config,
    update_existing: bool,
    wait_max: Duration,
    request_timeout: Duration,
) -> Result<()> {
    let mut attempt = 0usize;
    loop {
        // While a new cluster elects its meta leader (the first seconds after its servers
        // start), requests go unanswered: ask again after a short wait rather than after
        // the full request timeout, growing the wait so that a slow server still answers.
        let mut js = js.clone();
        js.set_timeout(ENSURE_ATTEMPT_TIMEOUT.saturating_mul(1 + attempt as u32 / 4).min(request_timeout));
        match ensure(&js, wanted, update_existing).await {
            Err(e) if e.is_retryable() => {
                attempt += 1;
                tracing::warn!(stream = %wanted.name, attempt, error = %e,
                               "stream not ready; retrying");
                tokio::time::sleep(super::connect::backoff(attempt, wait_max)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_setting() {
        let opts = NatsOptions::default();
        let wanted = desired_config(&opts, 0);
        assert!(differences(&wanted, &wanted).is_empty());
        let found = Config { max_messages: 5, num_replicas: 3, ..wanted.clone() };
        let d = differences(&found, &wanted);
        let names: Vec<_> = d.iter().map(|d| d.setting).collect();
        assert_eq!(names, ["replicas", "max_msgs"]);
        assert_eq!(describe(&d), "replicas is 3 (configured: 1), max_msgs is 5 (configured: 1024)");
    }

    #[test]
    fn merge_keeps_foreign_settings() {
        let opts = NatsOptions::default();
        let wanted = desired_config(&opts, 0);
        let existing = Config { max_bytes: 1 << 20, max_messages: 5, ..wanted.clone() };
        let m = merged(&existing, &wanted);
        assert_eq!(m.max_bytes, 1 << 20);
        assert_eq!(m.max_messages, 1024);
    }
}
