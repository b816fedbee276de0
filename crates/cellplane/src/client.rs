//! Connecting the operator commands (`kv`, `lease`) to a router or a cell.

use std::time::Duration;

use anyhow::Context;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Where a command sends its requests.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Comma-separated client addresses: a router, or the members of one cell.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,
    /// The tenant to send as `cellplane-tenant` metadata. A router otherwise takes
    /// it from the key's first path segment (`/tenant/...`); lease grants through a
    /// router need it.
    #[arg(long, global = true)]
    pub tenant: Option<String>,
    /// Deadline of each request.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 10s, 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    }
}

/// Adds the tenant metadata to every request.
#[derive(Clone)]
pub struct Tenant(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Tenant {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("cellplane-tenant", t.clone());
        }
        Ok(r)
    }
}

pub type Conn = InterceptedService<Channel, Tenant>;

impl TargetArgs {
    /// A channel balanced over the endpoints, with the tenant interceptor. Streams
    /// (watch, keep-alive) use it without the per-request deadline.
    pub async fn connect(&self, streaming: bool) -> anyhow::Result<Conn> {
        if self.endpoints.is_empty() {
            anyhow::bail!("--endpoints: give at least one address");
        }
        let mut eps = Vec::new();
        for e in &self.endpoints {
            let uri = if e.starts_with("http") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            let mut ep = Endpoint::from_shared(uri)
                .with_context(|| format!("--endpoints: `{e}` is not an address"))?
                .connect_timeout(Duration::from_secs(2));
            if !streaming {
                ep = ep.timeout(self.timeout);
            }
            eps.push(ep);
        }
        let channel = if eps.len() == 1 {
            let ep = eps.remove(0);
            let uri = ep.uri().to_string();
            ep.connect()
                .await
                .with_context(|| format!("cannot reach {uri}"))?
        } else {
            Channel::balance_list(eps.into_iter())
        };
        let tenant = match &self.tenant {
            Some(t) => Some(
                MetadataValue::try_from(t.as_str())
                    .map_err(|_| anyhow::anyhow!("--tenant: `{t}` must be printable ASCII"))?,
            ),
            None => None,
        };
        Ok(InterceptedService::new(channel, Tenant(tenant)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_garbage() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(
            parse_duration("ten")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }
}
