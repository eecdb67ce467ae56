//! `devsyncctl campaign`: create campaigns, show, watch and list their progress, pause, resume
//! and abort them, with the SQL of `devsync_store::campaigns`.
//!
//! Every argument is parsed and checked here, before the database is touched, so bad input
//! fails with one line naming the problem and creates or changes nothing: the campaign id
//! (`CampaignId::parse`), the selector (`labels:K=V,...`, `group:NAME`, `ids:A,B,...`,
//! `ids:@FILE` with one id per line, or `all`; device ids as `DeviceId::parse` accepts them),
//! the merge patch (a non-empty JSON object, inline or `@FILE`), the policy, the rate
//! (`N` or `N/s`, at least 1), max in flight, the waves (`parse_waves`), the abort
//! expressions (`failure-ratio>0.05`, `not-converged-after 10m`, joined with ` or `) and the
//! wave wait (a humantime duration of whole seconds).
//!
//! A created campaign is a row in state `pending`; the requestor replica holding the
//! scheduler lease counts its targets and dispatches them. `status --watch` polls its progress
//! twice a second until it is completed, aborted or expired: a progress bar on a terminal, one plain
//! line per refresh otherwise (or one JSON object per refresh with `--json`).

use std::collections::HashSet;
use std::io::{IsTerminal, Read};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use devsync_runtime::CommonSettings;
use devsync_store::campaigns::{
    self, AbortCriteria, CampaignError, Control, NewCampaign, Progress, Selector,
};
use devsync_types::{CampaignId, DeviceId, PushPolicy};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};

use crate::cli::{CampaignArgs, CampaignCommand};
use crate::output::table;

/// How often `status --watch` refreshes.
const REFRESH: Duration = Duration::from_millis(500);

/// Ids listed by `status` before the rest is only counted.
const SHOWN_IDS: usize = 5;

/// What the selector form and the expression syntax look like, for error messages.
const SELECTOR_FORMS: &str = "labels:K=V,..., group:NAME, ids:ID,..., ids:@FILE or all";
const ABORT_FORMS: &str = "failure-ratio>RATIO or not-converged-after DURATION";

/// Runs `devsyncctl campaign`.
pub async fn run(settings: &CommonSettings, args: CampaignArgs) -> anyhow::Result<()> {
    match args.command {
        CampaignCommand::Create {
            id,
            selector,
            patch,
            policy,
            rate,
            max_in_flight,
            waves,
            abort_if,
            wave_wait,
        } => {
            if selector.trim() == "ids:@-" && patch == "@-" {
                bail!("--selector and --patch cannot both read standard input");
            }
            let campaign = NewCampaign {
                id: parse_id(&id)?,
                selector: parse_selector(&selector)?,
                patch: read_patch(&patch)?,
                policy: policy.parse::<PushPolicy>()?,
                rate_per_sec: rate.as_deref().map(parse_rate).transpose()?,
                max_in_flight: max_in_flight
                    .as_deref()
                    .map(parse_max_in_flight)
                    .transpose()?,
                waves: campaigns::parse_waves(&waves)
                    .map_err(|error| anyhow::anyhow!("--waves {waves:?}: {error}"))?,
                abort: parse_abort(&abort_if)?,
                wave_wait: parse_wave_wait(&wave_wait)?,
            };
            let db = connect(settings).await?;
            explain(campaigns::create(&db, &campaign).await, || {
                format!("create campaign {}", campaign.id)
            })?;
            let selector = campaign.selector.to_json();
            // The campaign exists now: a failed count is reported, not an error.
            let matching = match count_matching(&db, &campaign.selector).await {
                Ok(1) => "1 enabled device matches now".to_owned(),
                Ok(count) => format!("{count} enabled devices match now"),
                Err(error) => format!("matching devices not counted: {error:#}"),
            };
            println!(
                "created campaign {} (pending): {}; {matching}",
                campaign.id,
                describe_selector(&selector),
            );
            println!(
                "policy {}, waves {}, rate {}, max in flight {}, wave wait {}, abort if {}",
                campaign.policy,
                describe_waves(&campaign.waves),
                describe_limit(campaign.rate_per_sec.map(i64::from), "/s"),
                describe_limit(campaign.max_in_flight.map(i64::from), ""),
                humantime::format_duration(campaign.wave_wait),
                describe_abort(&abort_json(&campaign.abort)),
            );
        }
        CampaignCommand::Status { id, json, watch } => {
            let id = parse_id(&id)?;
            let db = connect(settings).await?;
            if watch {
                watch_progress(&db, &id, json).await?;
            } else {
                let progress = explain(campaigns::progress(&db, &id).await, || {
                    format!("read campaign {id}")
                })?;
                if json {
                    println!("{}", progress_json(&progress)?);
                } else {
                    print_status(&progress);
                }
            }
        }
        CampaignCommand::List { limit, json } => {
            let db = connect(settings).await?;
            let mut listed = explain(campaigns::list(&db, i64::from(limit) + 1).await, || {
                "list campaigns".into()
            })?;
            let more = listed.len() > limit as usize;
            listed.truncate(limit as usize);
            print_list(&listed, json)?;
            if more && !json {
                println!("(more: raise --limit)");
            }
        }
        CampaignCommand::Pause { id } => control(settings, &id, Control::Pause).await?,
        CampaignCommand::Resume { id } => control(settings, &id, Control::Resume).await?,
        CampaignCommand::Abort { id } => control(settings, &id, Control::Abort).await?,
    }
    Ok(())
}

async fn connect(settings: &CommonSettings) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = devsync_store::pool(settings.database.url.expose(), 1)?;
    pool.get().await.context("connect to postgres")
}

async fn control(settings: &CommonSettings, id: &str, control: Control) -> anyhow::Result<()> {
    let id = parse_id(id)?;
    let db = connect(settings).await?;
    let state = explain(campaigns::control(&db, &id, control).await, || {
        format!("change the state of campaign {id}")
    })?;
    println!("campaign {id} {state}");
    Ok(())
}

/// Database failures get `what` as context; refusals (unknown campaign, id taken, a
/// transition the state does not allow) already say what was refused.
fn explain<T>(
    result: Result<T, CampaignError>,
    what: impl FnOnce() -> String,
) -> anyhow::Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(CampaignError::Store(error)) => Err(anyhow::Error::new(error).context(what())),
        Err(error) => Err(error.into()),
    }
}

fn parse_id(id: &str) -> anyhow::Result<CampaignId> {
    Ok(CampaignId::parse(id)?)
}

/// How many enabled devices the selector matches now (what the driver will count if
/// nothing changes meanwhile).
async fn count_matching(db: &impl GenericClient, selector: &Selector) -> anyhow::Result<i64> {
    let row = match selector {
        Selector::Ids(ids) => {
            db.query_one(
                "SELECT count(*) FROM devices WHERE enabled AND id = ANY($1)",
                &[ids],
            )
            .await?
        }
        Selector::Labels(labels) => {
            db.query_one(
                "SELECT count(*) FROM devices WHERE enabled AND labels @> $1",
                &[&Value::Object(labels.clone())],
            )
            .await?
        }
        Selector::Group(group) => {
            db.query_one(
                "SELECT count(*) FROM devices WHERE enabled AND labels @> $1",
                &[&serde_json::json!({ "group": group })],
            )
            .await?
        }
    };
    Ok(row.get(0))
}

/// Reads `arg` inline or, as `@FILE`, from a file (`@-`: standard input).
fn read_source(arg: &str, what: &str) -> anyhow::Result<(Vec<u8>, String)> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .with_context(|| format!("read {what} from standard input"))?;
            Ok((bytes, " from standard input".to_owned()))
        }
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("read {what} from {path:?}"))?;
            Ok((bytes, format!(" in {path:?}")))
        }
        None => Ok((arg.as_bytes().to_vec(), String::new())),
    }
}

/// The merge patch: a non-empty JSON object.
fn read_patch(arg: &str) -> anyhow::Result<Map<String, Value>> {
    let (bytes, origin) = read_source(arg, "patch")?;
    match devsync_types::state::parse_object(&bytes) {
        Ok(Value::Object(patch)) if patch.is_empty() => {
            bail!("patch{origin} is empty: the campaign would change nothing")
        }
        Ok(Value::Object(patch)) => Ok(patch),
        Ok(_) => bail!("patch{origin}: not a JSON object"),
        Err(error) => bail!("patch{origin}: {error}"),
    }
}

/// Parses `labels:K=V,...`, `group:NAME`, `ids:A,B,...`, `ids:@FILE` or `all`.
fn parse_selector(text: &str) -> anyhow::Result<Selector> {
    let text = text.trim();
    if text == "all" {
        return Ok(Selector::Labels(Map::new()));
    }
    let Some((kind, rest)) = text.split_once(':') else {
        bail!("selector {text:?} is not one of {SELECTOR_FORMS}");
    };
    match kind {
        "labels" => parse_selector_labels(rest)
            .map(Selector::Labels)
            .with_context(|| format!("selector {text:?}")),
        "group" => {
            if rest.is_empty() {
                bail!("selector {text:?}: the group name is empty");
            }
            if rest.chars().any(char::is_control) {
                bail!("selector {text:?}: the group name contains control characters");
            }
            Ok(Selector::Group(rest.to_owned()))
        }
        "ids" => match rest.strip_prefix('@') {
            Some(_) => {
                let (bytes, origin) = read_source(rest, "device ids")?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| anyhow::anyhow!("device ids{origin}: not UTF-8 text"))?;
                parse_id_lines(&text)
                    .map(Selector::Ids)
                    .with_context(|| format!("device ids{origin}"))
            }
            None => parse_ids(rest.split(','))
                .map(Selector::Ids)
                .with_context(|| format!("selector {text:?}")),
        },
        _ => bail!("selector {text:?}: unknown kind {kind:?}; expected {SELECTOR_FORMS}"),
    }
}

/// `K=V,K2=V2`: keys non-empty without whitespace, `=` or control characters; values
/// strings without control characters; a key given twice with different values is refused.
fn parse_selector_labels(text: &str) -> anyhow::Result<Map<String, Value>> {
    if text.is_empty() {
        bail!("no labels given (use `all` to target every device)");
    }
    let mut labels = Map::new();
    for pair in text.split(',') {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("label {pair:?} is not KEY=VALUE");
        };
        if key.is_empty() {
            bail!("label {pair:?}: the key is empty");
        }
        if let Some(c) = key
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '=')
        {
            bail!(
                "label key {key:?} contains {c:?}; whitespace, '=' and control characters are not allowed"
            );
        }
        if value.chars().any(char::is_control) {
            bail!("label {pair:?}: the value contains control characters");
        }
        let value = Value::String(value.to_owned());
        if labels.get(key).is_some_and(|previous| *previous != value) {
            bail!("label {key:?} is given twice with different values");
        }
        labels.insert(key.to_owned(), value);
    }
    Ok(labels)
}

/// Device ids, each checked; duplicates are dropped (first occurrence kept).
fn parse_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Vec<String>> {
    let mut seen = HashSet::new();
    let mut parsed = Vec::new();
    for id in ids {
        let id = DeviceId::parse(id)?;
        if seen.insert(id.as_str().to_owned()) {
            parsed.push(id.as_str().to_owned());
        }
    }
    if parsed.is_empty() {
        bail!("no device ids given");
    }
    Ok(parsed)
}

/// One device id per line; blank lines and lines starting with `#` are skipped, surrounding
/// whitespace (and `\r`) is ignored.
fn parse_id_lines(text: &str) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        DeviceId::parse(line).with_context(|| format!("line {}", number + 1))?;
        lines.push(line);
    }
    parse_ids(lines)
}

/// Devices per second: `N` or `N/s`, at least 1.
fn parse_rate(text: &str) -> anyhow::Result<u32> {
    let number = text.trim();
    let number = number.strip_suffix("/s").unwrap_or(number).trim();
    let rate: u64 = number.parse().map_err(|_| {
        anyhow::anyhow!("--rate {text:?}: expected devices per second, like 100 or 100/s")
    })?;
    if rate == 0 {
        bail!("--rate {text:?}: must be at least 1 device per second");
    }
    u32::try_from(rate)
        .ok()
        .filter(|rate| i32::try_from(*rate).is_ok())
        .ok_or_else(|| anyhow::anyhow!("--rate {text:?}: too large"))
}

/// Devices sent and not yet acknowledged at most, at least 1.
fn parse_max_in_flight(text: &str) -> anyhow::Result<u32> {
    let max: u64 = text.trim().parse().map_err(|_| {
        anyhow::anyhow!("--max-in-flight {text:?}: expected a number of devices, like 500")
    })?;
    if max == 0 {
        bail!("--max-in-flight {text:?}: must be at least 1");
    }
    u32::try_from(max)
        .ok()
        .filter(|max| i32::try_from(*max).is_ok())
        .ok_or_else(|| anyhow::anyhow!("--max-in-flight {text:?}: too large"))
}

/// A humantime duration of whole seconds (it is stored in seconds).
fn parse_wave_wait(text: &str) -> anyhow::Result<Duration> {
    let wait = humantime::parse_duration(text.trim())
        .map_err(|error| anyhow::anyhow!("--wave-wait {text:?}: {error} (e.g. 30s, 5m, 1h)"))?;
    if wait.subsec_nanos() != 0 {
        bail!("--wave-wait {text:?}: must be whole seconds");
    }
    if i32::try_from(wait.as_secs()).is_err() {
        bail!("--wave-wait {text:?}: too long");
    }
    Ok(wait)
}

/// Parses every `--abort-if`: conditions joined with ` or `; each kind at most once (or
/// repeated with the same value).
fn parse_abort(exprs: &[String]) -> anyhow::Result<AbortCriteria> {
    let mut criteria = AbortCriteria::default();
    for expr in exprs {
        let mut terms = vec![Vec::new()];
        for word in expr.split_whitespace() {
            if word.eq_ignore_ascii_case("or") {
                terms.push(Vec::new());
            } else if let Some(term) = terms.last_mut() {
                term.push(word);
            }
        }
        for term in terms {
            if term.is_empty() {
                bail!("--abort-if {expr:?}: empty condition; expected {ABORT_FORMS}");
            }
            parse_condition(&term.join(" "), &mut criteria)?;
        }
    }
    Ok(criteria)
}

/// One condition, added to `criteria`.
fn parse_condition(term: &str, criteria: &mut AbortCriteria) -> anyhow::Result<()> {
    let name_len = term
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .unwrap_or(term.len());
    let (name, rest) = term.split_at(name_len);
    let rest = rest.trim();
    let bad = |why: String| anyhow::anyhow!("--abort-if {term:?}: {why}");
    match name.to_ascii_lowercase().replace('_', "-").as_str() {
        "failure-ratio" => {
            let Some(value) = rest.strip_prefix('>') else {
                return Err(bad(
                    "expected failure-ratio>RATIO (e.g. failure-ratio>0.05 or >5%)".into(),
                ));
            };
            let value = value.trim();
            let ratio = match value.strip_suffix('%') {
                Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
                None => value.parse::<f64>(),
            }
            .map_err(|_| bad(format!("{value:?} is not a ratio like 0.05 or 5%")))?;
            if !(0.0..1.0).contains(&ratio) {
                return Err(bad(format!(
                    "{value:?}: the failure ratio must be at least 0 and below 1 (0% to below 100%)"
                )));
            }
            if criteria
                .failure_ratio
                .is_some_and(|previous| previous != ratio)
            {
                return Err(bad("failure-ratio is given twice".into()));
            }
            criteria.failure_ratio = Some(ratio);
        }
        "not-converged-after" => {
            let value = rest
                .strip_prefix('=')
                .or_else(|| rest.strip_prefix('>'))
                .unwrap_or(rest)
                .trim();
            if value.is_empty() {
                return Err(bad(
                    "expected not-converged-after DURATION (e.g. not-converged-after 10m)".into(),
                ));
            }
            let after = humantime::parse_duration(value)
                .map_err(|error| bad(format!("{value:?} is not a duration: {error}")))?;
            if after.is_zero() {
                return Err(bad("the duration must be more than 0".into()));
            }
            if criteria
                .not_converged_after
                .is_some_and(|previous| previous != after)
            {
                return Err(bad("not-converged-after is given twice".into()));
            }
            criteria.not_converged_after = Some(after);
        }
        _ => return Err(bad(format!("unknown condition; expected {ABORT_FORMS}"))),
    }
    Ok(())
}

/// The criteria as stored (`campaigns.abort_criteria`).
fn abort_json(criteria: &AbortCriteria) -> Value {
    let mut map = Map::new();
    if let Some(ratio) = criteria.failure_ratio {
        map.insert("failure_ratio".into(), ratio.into());
    }
    if let Some(after) = criteria.not_converged_after {
        map.insert(
            "not_converged_after_secs".into(),
            after.as_secs_f64().into(),
        );
    }
    Value::Object(map)
}

/// Stored abort criteria in the `--abort-if` syntax (`never` without any).
fn describe_abort(criteria: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(ratio) = criteria.get("failure_ratio").and_then(Value::as_f64) {
        parts.push(format!("failure-ratio>{ratio}"));
    }
    if let Some(secs) = criteria
        .get("not_converged_after_secs")
        .and_then(Value::as_f64)
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
    {
        parts.push(format!(
            "not-converged-after {}",
            humantime::format_duration(Duration::from_secs_f64(secs))
        ));
    }
    if parts.is_empty() {
        "never".into()
    } else {
        parts.join(" or ")
    }
}

/// Stored selector in words.
fn describe_selector(selector: &Value) -> String {
    if let Some(ids) = selector.get("ids").and_then(Value::as_array) {
        let names: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
        let shown = names
            .iter()
            .take(SHOWN_IDS)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let rest = names.len().saturating_sub(SHOWN_IDS);
        let plural = if names.len() == 1 { "" } else { "s" };
        return if rest > 0 {
            format!(
                "{} device{plural} by id ({shown} and {rest} more)",
                names.len()
            )
        } else {
            format!("{} device{plural} by id ({shown})", names.len())
        };
    }
    if let Some(group) = selector.get("group") {
        return match group {
            Value::String(group) => format!("devices of group {group}"),
            other => format!("devices of group {other}"),
        };
    }
    match selector.get("labels").and_then(Value::as_object) {
        Some(labels) if labels.is_empty() => "all devices".into(),
        Some(labels) => format!("devices labelled {}", format_labels(labels)),
        None => selector.to_string(),
    }
}

fn format_labels(labels: &Map<String, Value>) -> String {
    labels
        .iter()
        .map(|(key, value)| match value {
            Value::String(value) => format!("{key}={value}"),
            other => format!("{key}={other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One wave (cumulative per mille) as on the command line: `canary`, `10%`, `0.5%`.
fn describe_wave(per_mille: u16) -> String {
    match per_mille {
        1 => "canary".into(),
        p if p % 10 == 0 => format!("{}%", p / 10),
        p => format!("{}.{}%", p / 10, p % 10),
    }
}

fn describe_waves(waves: &[u16]) -> String {
    waves
        .iter()
        .map(|wave| describe_wave(*wave))
        .collect::<Vec<_>>()
        .join(",")
}

/// The stored waves, if they are what `parse_waves` produces.
fn stored_waves(progress: &Progress) -> Option<Vec<u16>> {
    serde_json::from_value(progress.waves.clone()).ok()
}

/// `N of M (share)`, 1-based.
fn describe_current_wave(progress: &Progress) -> String {
    match stored_waves(progress) {
        Some(waves) if !waves.is_empty() => {
            let index = usize::try_from(progress.wave)
                .unwrap_or(0)
                .min(waves.len() - 1);
            format!(
                "{} of {} ({})",
                index + 1,
                waves.len(),
                describe_wave(waves[index])
            )
        }
        _ => format!("{} of {}", progress.wave + 1, progress.waves),
    }
}

/// `N/M`, 1-based, for the list and the watch line.
fn short_wave(progress: &Progress) -> String {
    let total = stored_waves(progress).map_or(1, |waves| waves.len().max(1));
    let current = usize::try_from(progress.wave).unwrap_or(0).min(total - 1) + 1;
    format!("{current}/{total}")
}

fn describe_limit(limit: Option<i64>, unit: &str) -> String {
    limit.map_or_else(|| "unlimited".into(), |limit| format!("{limit}{unit}"))
}

fn format_time(at: Option<DateTime<Utc>>, missing: &str) -> String {
    at.map_or_else(
        || missing.to_owned(),
        |at| at.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

fn describe_state(progress: &Progress) -> String {
    match &progress.reason {
        Some(reason) if !reason.is_empty() => format!("{} ({reason})", progress.state),
        _ => progress.state.clone(),
    }
}

/// The progress as JSON: every stored field, plus `dispatched` and `finished`.
fn progress_json(progress: &Progress) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(progress)?;
    if let Value::Object(fields) = &mut value {
        fields.insert("dispatched".into(), progress.dispatched().into());
        fields.insert("finished".into(), progress.finished().into());
    }
    Ok(value)
}

fn print_status(progress: &Progress) {
    let dispatched = progress.dispatched();
    let share = if progress.targeted > 0 {
        format!(
            " ({:.1}%)",
            dispatched as f64 * 100.0 / progress.targeted as f64
        )
    } else {
        String::new()
    };
    let targeted = if progress.expanded {
        format!("{} (selector counted)", progress.targeted)
    } else {
        format!("{} so far (selector not counted yet)", progress.targeted)
    };
    let waves = stored_waves(progress)
        .map(|waves| describe_waves(&waves))
        .unwrap_or_else(|| progress.waves.to_string());
    let mut out = table(["campaign", progress.id.as_str()]);
    let rows = [
        ("state", describe_state(progress)),
        ("policy", progress.policy.clone()),
        ("targets", describe_selector(&progress.selector)),
        ("patch", progress.patch.to_string()),
        ("waves", waves),
        ("wave", describe_current_wave(progress)),
        (
            "rate",
            describe_limit(progress.rate_per_sec.map(i64::from), "/s"),
        ),
        (
            "max in flight",
            describe_limit(progress.max_in_flight.map(i64::from), ""),
        ),
        ("abort if", describe_abort(&progress.abort_criteria)),
        ("targeted", targeted),
        (
            "dispatched",
            format!("{dispatched} of {}{share}", progress.targeted),
        ),
        ("pending", progress.pending.to_string()),
        ("sent", progress.sent.to_string()),
        ("acked", progress.acked.to_string()),
        ("converged", progress.converged.to_string()),
        ("failed", progress.failed.to_string()),
        ("skipped", progress.skipped.to_string()),
        ("created (UTC)", format_time(Some(progress.created_at), "-")),
        ("started (UTC)", format_time(progress.started_at, "not yet")),
        ("finished (UTC)", format_time(progress.finished_at, "-")),
    ];
    for (name, value) in rows {
        out.add_row([name.to_owned(), value]);
    }
    println!("{out}");
}

fn print_list(listed: &[Progress], json: bool) -> anyhow::Result<()> {
    if json {
        for progress in listed {
            println!("{}", progress_json(progress)?);
        }
        return Ok(());
    }
    if listed.is_empty() {
        println!("no campaigns");
        return Ok(());
    }
    let mut out = table([
        "id",
        "state",
        "policy",
        "wave",
        "targeted",
        "dispatched",
        "converged",
        "failed",
        "created (UTC)",
    ]);
    for progress in listed {
        let targeted = if progress.expanded {
            progress.targeted.to_string()
        } else {
            format!("{}+", progress.targeted)
        };
        out.add_row([
            progress.id.clone(),
            progress.state.clone(),
            progress.policy.clone(),
            short_wave(progress),
            targeted,
            progress.dispatched().to_string(),
            progress.converged.to_string(),
            progress.failed.to_string(),
            format_time(Some(progress.created_at), "-"),
        ]);
    }
    println!("{out}");
    Ok(())
}

/// The counts on one line (the watch view and its plain form).
fn counts_line(progress: &Progress) -> String {
    format!(
        "targeted {}{}, dispatched {}, pending {}, sent {}, acked {}, converged {}, failed {}, skipped {}",
        progress.targeted,
        if progress.expanded { "" } else { "+" },
        progress.dispatched(),
        progress.pending,
        progress.sent,
        progress.acked,
        progress.converged,
        progress.failed,
        progress.skipped,
    )
}

fn watch_prefix(progress: &Progress) -> String {
    format!(
        "campaign {}: {}, wave {}",
        progress.id,
        describe_state(progress),
        short_wave(progress)
    )
}

/// Polls the campaign until it is finished: a bar on a terminal, otherwise one line (or one
/// JSON object) per refresh; then the final status. Ctrl-C stops watching (exit 130).
async fn watch_progress(
    db: &deadpool_postgres::Object,
    id: &CampaignId,
    json: bool,
) -> anyhow::Result<()> {
    let bar = (!json && std::io::stdout().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix}\n[{bar:40.cyan/blue}] {pos}/{len} dispatched\n{msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let mut ticker = tokio::time::interval(REFRESH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let progress = tokio::select! {
            progress = async {
                ticker.tick().await;
                campaigns::progress(db, id).await
            } => explain(progress, || format!("read campaign {id}"))?,
            signal = &mut interrupt => {
                signal.context("listen for Ctrl-C")?;
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                std::process::exit(130);
            }
        };
        if json {
            println!("{}", progress_json(&progress)?);
        } else if let Some(bar) = &bar {
            bar.set_prefix(watch_prefix(&progress));
            bar.set_message(counts_line(&progress));
            bar.set_length(u64::try_from(progress.targeted).unwrap_or(0));
            bar.set_position(u64::try_from(progress.dispatched()).unwrap_or(0));
        } else {
            println!(
                "{} {}: {}",
                Utc::now().format("%H:%M:%S"),
                watch_prefix(&progress),
                counts_line(&progress)
            );
        }
        if progress.finished() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            if !json {
                print_status(&progress);
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn abort(exprs: &[&str]) -> anyhow::Result<AbortCriteria> {
        parse_abort(&exprs.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn selectors() {
        assert_eq!(
            parse_selector("labels:env=prod,site=a=b").unwrap(),
            Selector::Labels(
                json!({"env": "prod", "site": "a=b"})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
        assert_eq!(
            parse_selector("group:canaries").unwrap(),
            Selector::Group("canaries".into())
        );
        assert_eq!(
            parse_selector("ids:a,b,a").unwrap(),
            Selector::Ids(vec!["a".into(), "b".into()])
        );
        assert_eq!(parse_selector("all").unwrap(), Selector::Labels(Map::new()));
        for bad in [
            "",
            "everything",
            "labels:",
            "labels:env",
            "labels:=x",
            "labels:a=1,a=2",
            "group:",
            "ids:",
            "ids:a,,b",
            "ids:a.b",
            "tags:x=y",
            "ids:@/nonexistent/devsync-ids",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?} must be refused");
        }
        let err = parse_selector("ids:ok,bad.id").unwrap_err();
        assert!(
            format!("{err:#}").contains("device id \"bad.id\" contains '.'"),
            "{err:#}"
        );
    }

    #[test]
    fn id_files_skip_blanks_and_comments() {
        assert_eq!(
            parse_id_lines("# fleet\n d1 \r\n\nd2\nd1\n").unwrap(),
            vec!["d1".to_owned(), "d2".to_owned()]
        );
        let err = parse_id_lines("d1\nd 2\n").unwrap_err();
        assert!(format!("{err:#}").starts_with("line 2: "), "{err:#}");
        assert!(parse_id_lines("# none\n\n").is_err());
    }

    #[test]
    fn abort_expressions() {
        let both = AbortCriteria {
            failure_ratio: Some(0.05),
            not_converged_after: Some(Duration::from_secs(600)),
        };
        for exprs in [
            vec!["failure-ratio>0.05 or not-converged-after 10m"],
            vec!["failure-ratio > 5%", "not-converged-after=10m"],
            vec!["not-converged-after>10m OR failure_ratio>0.05"],
            vec![
                "failure-ratio>0.05",
                "failure-ratio>0.05 or not-converged-after 600s",
            ],
        ] {
            assert_eq!(abort(&exprs).unwrap(), both, "{exprs:?}");
        }
        assert_eq!(abort(&[]).unwrap(), AbortCriteria::default());
        for (bad, needle) in [
            ("failure-ratio>1.5", "\"failure-ratio>1.5\""),
            ("failure-ratio<0.1", "expected failure-ratio>RATIO"),
            ("failure-ratio>lots", "\"lots\" is not a ratio"),
            (
                "not-converged-after",
                "expected not-converged-after DURATION",
            ),
            ("not-converged-after 10 parsecs", "is not a duration"),
            ("not-converged-after 0s", "more than 0"),
            ("failure-ratio>0.05 or", "empty condition"),
            (
                "failure-ratio>0.05 or bogus>1",
                "\"bogus>1\": unknown condition",
            ),
        ] {
            let err = abort(&[bad]).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        let twice = abort(&["failure-ratio>0.05", "failure-ratio>0.1"]).unwrap_err();
        assert!(twice.to_string().contains("given twice"), "{twice}");
    }

    #[test]
    fn rates_limits_and_waits() {
        assert_eq!(parse_rate("100").unwrap(), 100);
        assert_eq!(parse_rate("100/s").unwrap(), 100);
        for bad in [
            "0",
            "0/s",
            "-1",
            "fast",
            "100/m",
            "4294967296",
            "2147483648",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_max_in_flight("50").unwrap(), 50);
        assert!(parse_max_in_flight("0").is_err());
        assert_eq!(parse_wave_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wave_wait("0s").unwrap(), Duration::ZERO);
        assert!(parse_wave_wait("1500ms").is_err());
        assert!(parse_wave_wait("soon").is_err());
    }

    #[test]
    fn descriptions() {
        assert_eq!(describe_waves(&[1, 5, 100, 1000]), "canary,0.5%,10%,100%");
        assert_eq!(
            describe_abort(&json!({"failure_ratio": 0.05, "not_converged_after_secs": 600.0})),
            "failure-ratio>0.05 or not-converged-after 10m"
        );
        assert_eq!(describe_abort(&json!({})), "never");
        assert_eq!(describe_selector(&json!({"labels": {}})), "all devices");
        assert_eq!(
            describe_selector(&json!({"labels": {"env": "prod"}})),
            "devices labelled env=prod"
        );
        assert_eq!(
            describe_selector(&json!({"group": "g1"})),
            "devices of group g1"
        );
        assert_eq!(
            describe_selector(&json!({"ids": ["a", "b", "c", "d", "e", "f", "g"]})),
            "7 devices by id (a, b, c, d, e and 2 more)"
        );
    }
}
