//! The value parsers of the command line: durations, counts, endpoints,
//! secrets, user ids and API keys, each error naming what is wrong (and
//! never a secret).

use super::*;

pub(super) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 500ms, 30s, 7d)"))
}

/// A count that must be at least 1.
pub(super) fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A gRPC endpoint URL: `host:port` gets `http://`.
pub(super) fn grpc_endpoint(s: &str) -> Result<String, String> {
    if s.contains("://") {
        Ok(s.to_string())
    } else if s.is_empty() {
        Err("give host:port or a URL".into())
    } else {
        Ok(format!("http://{s}"))
    }
}

/// The shortest HS256 secret a node or `herald token` accepts.
pub const MIN_SECRET_BYTES: usize = 8;

/// Checks a JWT secret (the same rule for `serve` and `token`).
pub(super) fn secret(s: &str) -> Result<String, String> {
    if s.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the JWT secret must be at least {MIN_SECRET_BYTES} bytes"
        ));
    }
    Ok(s.to_string())
}

/// A user id for `herald token`: the check gRPC requests and nodes apply
/// to a token's `sub`, so no token is minted that a node would refuse.
pub(super) fn user_id(s: &str) -> Result<String, String> {
    crate::protocol::check_user_id(s, crate::protocol::MAX_USER_ID_BYTES)?;
    Ok(s.to_string())
}

/// Parses `--api-keys` values. Not a plain function parser: clap's error
/// for those quotes the value, and this one is a secret. The error names
/// the setting in each of its forms and says what is wrong (see
/// [`KeySpec::parse`]), never the value.
#[derive(Clone, Copy, Debug)]
pub(super) struct ApiKeyParser;

impl clap::builder::TypedValueParser for ApiKeyParser {
    type Value = KeySpec;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KeySpec, clap::Error> {
        let refuse = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--api-keys (HERALD_API_KEYS, api_keys in the config file): {why}\n"),
            )
            .with_cmd(cmd)
        };
        let s = value
            .to_str()
            .ok_or_else(|| refuse("the value is not UTF-8".into()))?;
        KeySpec::parse(s).map_err(refuse)
    }
}
