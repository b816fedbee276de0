//! Connecting the commands to a router or a cell: TLS (`--cacert`, `--cert`,
//! `--key`, as etcdctl), a password login (`--user`), and the tenant metadata.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cellplane_proto::etcdserverpb::AuthenticateRequest;
use cellplane_proto::etcdserverpb::auth_client::AuthClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// TLS toward a router, a cell or the directory, as etcdctl spells it.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Trust this CA certificate (PEM) and connect over TLS (`cells/secrets/ca.crt`
    /// after `cellplane certs generate`).
    #[arg(long, global = true, env = "CELLPLANE_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Prove who you are with this client certificate (PEM): a tenant's or an
    /// operator's (`cellplane certs issue`).
    #[arg(
        long = "cert",
        id = "tls_cert",
        value_name = "FILE",
        global = true,
        env = "CELLPLANE_CERT",
        requires = "tls_key"
    )]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long = "key",
        id = "tls_key",
        value_name = "FILE",
        global = true,
        env = "CELLPLANE_KEY",
        requires = "tls_cert"
    )]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// The client TLS settings, or `None` for plaintext.
    pub fn client_config(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.cacert else {
            if self.cert.is_some() {
                anyhow::bail!("--cert needs --cacert: a certificate is only sent over TLS");
            }
            return Ok(None);
        };
        let ca_pem =
            std::fs::read(ca).with_context(|| format!("--cacert: cannot read {}", ca.display()))?;
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let files = cellplane_security::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                };
                Ok(Some(files.load()?.client()))
            }
            _ => Ok(Some(cellplane_security::tls::client_trusting(&ca_pem))),
        }
    }

    /// An endpoint for `addr` (host:port), TLS or not.
    pub fn endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let tls = self.client_config()?;
        cellplane_security::endpoint(addr, tls.as_ref())
            .with_context(|| format!("`{addr}` is not an address"))
    }
}

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
    /// Log in to the router as `name:password` (etcd's auth flow); `name` alone
    /// reads the password from the first line of stdin.
    #[arg(long, global = true, env = "CELLPLANE_USER")]
    pub user: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
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

/// Adds the tenant metadata and the login token to every request.
#[derive(Clone, Default)]
pub struct Tenant {
    tenant: Option<MetadataValue<Ascii>>,
    token: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Tenant {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.tenant {
            r.metadata_mut().insert("cellplane-tenant", t.clone());
        }
        if let Some(t) = &self.token {
            r.metadata_mut().insert("token", t.clone());
        }
        Ok(r)
    }
}

pub type Conn = InterceptedService<Channel, Tenant>;

/// `name:password`, or `name` and the first line of stdin.
fn user_and_password(user: &str) -> anyhow::Result<(String, String)> {
    if let Some((name, pw)) = user.split_once(':') {
        return Ok((name.to_string(), pw.to_string()));
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("--user without a password: cannot read it from stdin")?;
    Ok((
        user.to_string(),
        line.trim_end_matches(['\r', '\n']).to_string(),
    ))
}

/// Logs in over `channel` and returns the token.
async fn login(channel: Channel, user: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    let (name, password) = user_and_password(user)?;
    let token = AuthClient::new(channel)
        .authenticate(AuthenticateRequest {
            name: name.clone(),
            password,
        })
        .await
        .map_err(|s| anyhow::anyhow!("--user {name}: login failed: {}", s.message()))?
        .into_inner()
        .token;
    MetadataValue::try_from(token.as_str()).context("the router returned an unusable token")
}

impl TargetArgs {
    /// A channel balanced over the endpoints, with the tenant interceptor. Streams
    /// (watch, keep-alive) use it without the per-request deadline.
    pub async fn connect(&self, streaming: bool) -> anyhow::Result<Conn> {
        if self.endpoints.is_empty() {
            anyhow::bail!("--endpoints: give at least one address");
        }
        let mut eps = Vec::new();
        for e in &self.endpoints {
            let mut ep = self
                .tls
                .endpoint(e)
                .context("--endpoints")?
                .connect_timeout(Duration::from_secs(2));
            if !streaming {
                ep = ep.timeout(self.timeout);
            }
            eps.push(ep);
        }
        let channel = if eps.len() == 1 {
            let ep = eps.remove(0);
            let uri = ep.uri().to_string();
            ep.connect().await.with_context(|| {
                format!("cannot reach {uri} (if it serves TLS, pass --cacert, and --cert/--key or --user)")
            })?
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
        let token = match &self.user {
            Some(user) => Some(login(channel.clone(), user).await?),
            None => None,
        };
        Ok(InterceptedService::new(channel, Tenant { tenant, token }))
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
