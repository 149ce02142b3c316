//! The IoT Edge part of the mapping: `[edge_ca]` (quickstart, preloaded or issued) and edged's
//! `[agent]` with edgeAgent's defaults.

use toml::{Table, Value};

use super::*;

/// Maps `[edge_ca]` to certd/keyd entries and returns edged's `[edge_ca]` table.
pub(super) fn map_edge_ca(mapper: &mut Mapper, raw: RawEdgeCa) -> Result<Table, Problem> {
    let key = "edge_ca";
    let mut table = Table::new();
    let issuance = &raw.issuance();
    let preloaded = raw.cert.is_some() || raw.pk.is_some();
    let issued = issuance.method.is_some();
    if preloaded {
        if issued
            || raw.auto_generated_edge_ca_expiry_days.is_some()
            || issuance.auto_renew.is_some()
        {
            return Err(Problem::new(
                format!("{key}.cert"),
                "a preloaded Edge CA (cert, pk) cannot be combined with issuance or renewal settings",
            ));
        }
        let cert = raw
            .cert
            .as_deref()
            .ok_or_else(|| Problem::new(format!("{key}.cert"), "is required with pk"))?;
        let pk = raw
            .pk
            .as_deref()
            .ok_or_else(|| Problem::new(format!("{key}.pk"), "is required with cert"))?;
        mapper.preload_cert("aziot-edged-ca", cert, &format!("{key}.cert"))?;
        mapper.preload_key("aziot-edged-ca", pk, &format!("{key}.pk"))?;
        table.insert("cert".into(), string("aziot-edged-ca"));
        table.insert("key".into(), string("aziot-edged-ca"));
        return Ok(table);
    }
    if issued {
        if raw.auto_generated_edge_ca_expiry_days.is_some() {
            return Err(Problem::new(
                format!("{key}.auto_generated_edge_ca_expiry_days"),
                "only for the quickstart Edge CA; use expiry_days with method",
            ));
        }
        let mut options = mapper.issuance("aziot-edged-ca", issuance, key, None)?;
        if issuance.method.as_deref() == Some("est") {
            // edged puts the subject in its CSR; an EST server takes the CSR as it is, so
            // certd gets no subject to apply (edged's table below keeps it).
            options.remove("common_name");
            options.remove("subject");
        }
        // certd issues a CA without an issuer only for IDs allowed to be one.
        options.insert("ca".into(), Value::Boolean(true));
        mapper
            .certd_issuance
            .insert("aziot-edged-ca".into(), Value::Table(options.clone()));
        mapper
            .certd_issuance
            .insert("aziot-edged-ca-temp".into(), Value::Table(options));
        table.insert("cert".into(), string("aziot-edged-ca"));
        table.insert("key".into(), string("aziot-edged-ca"));
        copy_subject(&mut table, issuance);
        // An issued Edge CA is renewed by default, as the quickstart one is.
        let renew = match &issuance.auto_renew {
            Some(renew) => AutoRenew::parse(renew, &format!("{key}.auto_renew"))?,
            None => AutoRenew::quickstart_default(),
        };
        table.insert("auto_renew".into(), renew.table());
        return Ok(table);
    }
    // Quickstart: only CN/subject, expiry and renewal may be set.
    let only_issuance = [
        ("expiry_days", issuance.expiry_days.is_some()),
        ("url", issuance.url.is_some()),
        ("username", issuance.username.is_some()),
        ("password", issuance.password.is_some()),
        ("identity_cert", issuance.identity_cert.is_some()),
        ("identity_pk", issuance.identity_pk.is_some()),
        (
            "bootstrap_identity_cert",
            issuance.bootstrap_identity_cert.is_some(),
        ),
        (
            "bootstrap_identity_pk",
            issuance.bootstrap_identity_pk.is_some(),
        ),
    ];
    if let Some((field, _)) = only_issuance.iter().find(|(_, present)| *present) {
        return Err(Problem::new(
            format!("{key}.{field}"),
            "needs method (issued Edge CA); the quickstart Edge CA takes auto_generated_edge_ca_expiry_days",
        ));
    }
    if issuance.common_name.is_some() && issuance.subject.is_some() {
        return Err(Problem::new(
            format!("{key}.subject"),
            format!("{key}.common_name and {key}.subject cannot both be set"),
        ));
    }
    let days = raw.auto_generated_edge_ca_expiry_days.unwrap_or(90);
    if days <= 0 {
        return Err(Problem::new(
            format!("{key}.auto_generated_edge_ca_expiry_days"),
            "expiry_days must be greater than 0",
        ));
    }
    let renew = match &issuance.auto_renew {
        Some(renew) => {
            let renew = AutoRenew::parse(renew, &format!("{key}.auto_renew"))?;
            if !renew.rotate_key {
                return Err(Problem::new(
                    format!("{key}.auto_renew.rotate_key"),
                    "the quickstart Edge CA must rotate its key (rotate_key = true)",
                ));
            }
            renew
        }
        None => AutoRenew::quickstart_default(),
    };
    let mut options = Table::new();
    options.insert("method".into(), string("self_signed"));
    options.insert("expiry_days".into(), Value::Integer(days));
    options.insert("ca".into(), Value::Boolean(true));
    mapper
        .certd_issuance
        .insert("aziot-edged-ca".into(), Value::Table(options.clone()));
    mapper
        .certd_issuance
        .insert("aziot-edged-ca-temp".into(), Value::Table(options));
    copy_subject(&mut table, issuance);
    table.insert("auto_renew".into(), renew.table());
    Ok(table)
}

fn copy_subject(table: &mut Table, issuance: &RawIssuance) {
    if let Some(common_name) = &issuance.common_name {
        table.insert("common_name".into(), string(common_name));
    }
    if let Some(subject) = &issuance.subject {
        let subject: Table = subject
            .iter()
            .map(|(name, value)| (name.clone(), string(value)))
            .collect();
        table.insert("subject".into(), Value::Table(subject));
    }
}

/// edged's `[agent]` with edgeAgent's defaults filled in.
pub(super) fn map_agent(raw: Option<RawAgent>) -> Result<Table, Problem> {
    let raw = raw.unwrap_or(RawAgent {
        name: None,
        agent_type: None,
        image_pull_policy: None,
        config: None,
        env: None,
    });
    let mut table = Table::new();
    table.insert(
        "name".into(),
        string(raw.name.unwrap_or_else(|| "edgeAgent".into())),
    );
    let agent_type = raw.agent_type.unwrap_or_else(|| "docker".into());
    if agent_type != "docker" && agent_type != "process" {
        return Err(Problem::new(
            "agent.type",
            format!("unknown type {agent_type:?} (expected docker or process)"),
        ));
    }
    table.insert("type".into(), string(agent_type));
    let policy = raw.image_pull_policy.unwrap_or_else(|| "on-create".into());
    if !policy.eq_ignore_ascii_case("on-create") && !policy.eq_ignore_ascii_case("never") {
        return Err(Problem::new(
            "agent.imagePullPolicy",
            format!("unknown policy {policy:?} (expected on-create or never)"),
        ));
    }
    table.insert("imagePullPolicy".into(), string(policy));
    let mut config = Table::new();
    let (image, create_options, auth) = match raw.config {
        Some(config) => (config.image, config.create_options, config.auth),
        None => (None, None, None),
    };
    config.insert(
        "image".into(),
        string(image.unwrap_or_else(|| DEFAULT_AGENT_IMAGE.into())),
    );
    if let Some(create_options) = create_options {
        if !create_options.is_table() {
            return Err(Problem::new(
                "agent.config.createOptions",
                "expected a table (a Docker create body)",
            ));
        }
        config.insert("createOptions".into(), create_options);
    }
    if let Some(auth) = auth {
        let mut auth_table = Table::new();
        for (name, value) in [
            ("serveraddress", auth.serveraddress),
            ("username", auth.username),
            ("password", auth.password),
        ] {
            if let Some(value) = value {
                auth_table.insert(name.into(), string(value));
            }
        }
        config.insert("auth".into(), Value::Table(auth_table));
    }
    table.insert("config".into(), Value::Table(config));
    if let Some(env) = raw.env {
        table.insert("env".into(), Value::Table(env));
    }
    Ok(table)
}
