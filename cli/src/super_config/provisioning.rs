//! `[provisioning]` → identityd's `[provisioning]`, plus the `device-id` key and cert entries
//! of keyd and certd and the principals identityd needs for them.

use toml::{Table, Value};

use super::*;

/// Maps `[provisioning]` to identityd's table and the keyd/certd entries it needs.
pub(super) fn map_provisioning(
    mapper: &mut Mapper,
    raw: RawProvisioning,
    local_gateway_hostname: Option<&str>,
) -> Result<Table, MapError> {
    let mut table = Table::new();
    let unexpected = |fields: &[(&str, bool)], source: &str| -> Result<(), Problem> {
        match fields.iter().find(|(_, present)| *present) {
            Some((field, _)) => Err(Problem::new(
                format!("provisioning.{field}"),
                format!("not used with source = {source:?}"),
            )),
            None => Ok(()),
        }
    };
    match raw.source.as_str() {
        "manual" => {
            unexpected(
                &[
                    ("global_endpoint", raw.global_endpoint.is_some()),
                    ("id_scope", raw.id_scope.is_some() || raw.scope_id.is_some()),
                    ("payload", raw.payload.is_some()),
                    ("attestation", raw.attestation.is_some()),
                    ("operational_cert", raw.operational_cert.is_some()),
                ],
                "manual",
            )?;
            table.insert("source".into(), string("manual"));
            let (hub, device_id) = if let Some(connection_string) = &raw.connection_string {
                unexpected(
                    &[
                        ("iothub_hostname", raw.iothub_hostname.is_some()),
                        ("device_id", raw.device_id.is_some()),
                        ("authentication", raw.authentication.is_some()),
                    ],
                    "manual with connection_string",
                )?;
                let parsed =
                    parse_connection_string(connection_string, "provisioning.connection_string")?;
                add_inline_device_key(mapper, parsed.key);
                let mut auth = Table::new();
                auth.insert("method".into(), string("sas"));
                auth.insert("device_id_pk".into(), string("device-id"));
                table.insert("authentication".into(), Value::Table(auth));
                (parsed.hostname, parsed.device_id)
            } else {
                let hub = raw.iothub_hostname.clone().ok_or_else(|| {
                    Problem::new(
                        "provisioning.iothub_hostname",
                        "is required (or set connection_string)",
                    )
                })?;
                let device_id = raw.device_id.clone().ok_or_else(|| {
                    Problem::new(
                        "provisioning.device_id",
                        "is required (or set connection_string)",
                    )
                })?;
                let auth_raw = raw.authentication.ok_or_else(|| {
                    Problem::new(
                        "provisioning.authentication",
                        "is required (method = \"sas\" or \"x509\")",
                    )
                })?;
                let mut auth = Table::new();
                match auth_raw.method.as_str() {
                    "sas" => {
                        unexpected(
                            &[
                                (
                                    "authentication.identity_cert",
                                    auth_raw.identity_cert.is_some(),
                                ),
                                ("authentication.identity_pk", auth_raw.identity_pk.is_some()),
                            ],
                            "manual with method = \"sas\"",
                        )?;
                        let value = auth_raw.device_id_pk.ok_or_else(|| {
                            Problem::new(
                                "provisioning.authentication.device_id_pk",
                                "is required with method = \"sas\"",
                            )
                        })?;
                        device_symmetric_key(
                            mapper,
                            value,
                            "provisioning.authentication.device_id_pk",
                        )?;
                        auth.insert("method".into(), string("sas"));
                        auth.insert("device_id_pk".into(), string("device-id"));
                    }
                    "x509" => {
                        unexpected(
                            &[(
                                "authentication.device_id_pk",
                                auth_raw.device_id_pk.is_some(),
                            )],
                            "manual with method = \"x509\"",
                        )?;
                        auth.insert("method".into(), string("x509"));
                        auth.insert("identity_cert".into(), string("device-id"));
                        auth.insert("identity_pk".into(), string("device-id"));
                        let issued = device_cert(
                            mapper,
                            auth_raw.identity_cert,
                            auth_raw.identity_pk,
                            "provisioning.authentication",
                            &device_id,
                            false,
                        )?;
                        // A DN subject is kept whole, as the reference writes it (identityd
                        // still forces CN to the device ID). Without one identityd's CSR names
                        // just the device ID, so nothing is written.
                        if let Some(dn) = issued.as_ref().and_then(DeviceCertIssued::dn_table) {
                            auth.insert("csr_subject".into(), Value::Table(dn));
                        }
                    }
                    other => {
                        return Err(Problem::new(
                            "provisioning.authentication.method",
                            format!("unknown method {other:?} (expected sas or x509)"),
                        )
                        .into())
                    }
                }
                table.insert("authentication".into(), Value::Table(auth));
                (hub, device_id)
            };
            table.insert("iothub_hostname".into(), string(hub));
            table.insert("device_id".into(), string(device_id));
            if let Some(gateway) = local_gateway_hostname {
                table.insert("local_gateway_hostname".into(), string(gateway));
            }
        }
        "dps" => {
            if local_gateway_hostname.is_some() {
                return Err(Problem::new(
                    "local_gateway_hostname",
                    "DPS provisioning is not supported in nested mode",
                )
                .into());
            }
            unexpected(
                &[
                    ("iothub_hostname", raw.iothub_hostname.is_some()),
                    ("device_id", raw.device_id.is_some()),
                    ("connection_string", raw.connection_string.is_some()),
                    ("authentication", raw.authentication.is_some()),
                ],
                "dps",
            )?;
            table.insert("source".into(), string("dps"));
            table.insert(
                "global_endpoint".into(),
                string(
                    raw.global_endpoint
                        .unwrap_or_else(|| DEFAULT_DPS_ENDPOINT.to_owned()),
                ),
            );
            let scope = raw.id_scope.or(raw.scope_id).ok_or_else(|| {
                Problem::new("provisioning.id_scope", "is required with source = \"dps\"")
            })?;
            table.insert("scope_id".into(), string(scope));
            if let Some(payload) = raw.payload {
                check_file_uri(&payload.uri, "provisioning.payload.uri")?;
                let mut payload_table = Table::new();
                payload_table.insert("uri".into(), string(payload.uri));
                table.insert("payload".into(), Value::Table(payload_table));
            }
            let attestation = raw.attestation.ok_or_else(|| {
                Problem::new(
                    "provisioning.attestation",
                    "is required with source = \"dps\"",
                )
            })?;
            let mut att = Table::new();
            match attestation.method.as_str() {
                "symmetric_key" => {
                    unexpected(
                        &[
                            (
                                "attestation.identity_cert",
                                attestation.identity_cert.is_some(),
                            ),
                            ("attestation.identity_pk", attestation.identity_pk.is_some()),
                        ],
                        "dps with method = \"symmetric_key\"",
                    )?;
                    let registration_id = attestation.registration_id.ok_or_else(|| {
                        Problem::new(
                            "provisioning.attestation.registration_id",
                            "is required with method = \"symmetric_key\"",
                        )
                    })?;
                    let value = attestation.symmetric_key.ok_or_else(|| {
                        Problem::new(
                            "provisioning.attestation.symmetric_key",
                            "is required with method = \"symmetric_key\"",
                        )
                    })?;
                    device_symmetric_key(mapper, value, "provisioning.attestation.symmetric_key")?;
                    att.insert("method".into(), string("symmetric_key"));
                    att.insert("registration_id".into(), string(registration_id));
                    att.insert("symmetric_key".into(), string("device-id"));
                }
                "x509" => {
                    unexpected(
                        &[(
                            "attestation.symmetric_key",
                            attestation.symmetric_key.is_some(),
                        )],
                        "dps with method = \"x509\"",
                    )?;
                    att.insert("method".into(), string("x509"));
                    att.insert("identity_cert".into(), string("device-id"));
                    att.insert("identity_pk".into(), string("device-id"));
                    let default_cn = attestation.registration_id.clone();
                    let issued = device_cert(
                        mapper,
                        attestation.identity_cert,
                        attestation.identity_pk,
                        "provisioning.attestation",
                        default_cn.as_deref().unwrap_or(""),
                        true,
                    )?;
                    // A DN subject whose CN is the registration ID becomes the registration ID
                    // table, as the reference writes it; otherwise the ID as given, or else the
                    // cert's common name.
                    let common_name = issued.as_ref().and_then(DeviceCertIssued::common_name);
                    let dn = issued.as_ref().and_then(DeviceCertIssued::dn_table);
                    let registration_id = attestation.registration_id.as_deref();
                    match (registration_id, dn) {
                        (id, Some(dn))
                            if common_name.is_some()
                                && id.is_none_or(|id| Some(id) == common_name) =>
                        {
                            att.insert("registration_id".into(), Value::Table(dn));
                        }
                        (Some(id), _) => {
                            att.insert("registration_id".into(), string(id));
                        }
                        (None, _) => {
                            if let Some(common_name) = common_name {
                                att.insert("registration_id".into(), string(common_name));
                            }
                        }
                    }
                    if let Some(DeviceCertIssued {
                        auto_renew: Some(renew),
                        ..
                    }) = &issued
                    {
                        att.insert("identity_auto_renew".into(), renew.table());
                    }
                }
                "tpm" => {
                    let registration_id = attestation.registration_id.ok_or_else(|| {
                        Problem::new(
                            "provisioning.attestation.registration_id",
                            "is required with method = \"tpm\"",
                        )
                    })?;
                    unexpected(
                        &[
                            (
                                "attestation.symmetric_key",
                                attestation.symmetric_key.is_some(),
                            ),
                            (
                                "attestation.identity_cert",
                                attestation.identity_cert.is_some(),
                            ),
                            ("attestation.identity_pk", attestation.identity_pk.is_some()),
                        ],
                        "dps with method = \"tpm\"",
                    )?;
                    // The device key lives in the TPM, not in keyd.
                    mapper.keyd_identityd.retain(|id| id != "device-id");
                    att.insert("method".into(), string("tpm"));
                    att.insert("registration_id".into(), string(registration_id));
                }
                other => {
                    return Err(Problem::new(
                        "provisioning.attestation.method",
                        format!("unknown method {other:?} (expected symmetric_key, x509 or tpm)"),
                    )
                    .into())
                }
            }
            table.insert("attestation".into(), Value::Table(att));
            if let Some(operational) = raw.operational_cert {
                table.insert(
                    "operational_cert".into(),
                    Value::Table(map_operational_cert(mapper, operational)?),
                );
            }
        }
        "none" => {
            unexpected(
                &[
                    ("iothub_hostname", raw.iothub_hostname.is_some()),
                    ("device_id", raw.device_id.is_some()),
                    ("connection_string", raw.connection_string.is_some()),
                    ("authentication", raw.authentication.is_some()),
                    ("global_endpoint", raw.global_endpoint.is_some()),
                    ("id_scope", raw.id_scope.is_some() || raw.scope_id.is_some()),
                    ("payload", raw.payload.is_some()),
                    ("attestation", raw.attestation.is_some()),
                    ("operational_cert", raw.operational_cert.is_some()),
                ],
                "none",
            )?;
            table.insert("source".into(), string("none"));
        }
        other => {
            return Err(Problem::new(
                "provisioning.source",
                format!("unknown source {other:?} (expected manual, dps or none)"),
            )
            .into())
        }
    }
    Ok(table)
}

/// `[provisioning.operational_cert]` → identityd's table, with identityd's rights on the cert,
/// the key and the renewal's temporary key.
fn map_operational_cert(mapper: &mut Mapper, raw: RawOperationalCert) -> Result<Table, Problem> {
    const KEY: &str = "provisioning.operational_cert";
    let id = |value: Option<String>, field: &str, scheme: &str| -> Result<String, Problem> {
        let value = value.unwrap_or_else(|| "aziot-dps-operational".to_owned());
        let id = value.strip_prefix(scheme).unwrap_or(&value).to_owned();
        if id.is_empty() || id.contains("://") || id.starts_with("pkcs11:") {
            return Err(Problem::new(
                format!("{KEY}.{field}"),
                "must be a cert/key ID (DPS issues it; nothing to preload)",
            ));
        }
        Ok(id)
    };
    let cert = id(raw.cert, "cert", "cert://")?;
    let pk = id(raw.pk, "pk", "key://")?;
    let mut table = Table::new();
    table.insert("cert".into(), string(cert.clone()));
    table.insert("pk".into(), string(pk.clone()));
    if let Some(renew) = &raw.auto_renew {
        let renew = AutoRenew::parse(renew, &format!("{KEY}.auto_renew"))?;
        if renew.rotate_key {
            push_unique(&mut mapper.keyd_identityd, format!("{pk}-temp"));
        }
        table.insert("auto_renew".into(), renew.table());
    } else {
        // identityd's default renewal rotates the key.
        push_unique(&mut mapper.keyd_identityd, format!("{pk}-temp"));
    }
    push_unique(&mut mapper.keyd_identityd, &pk);
    push_unique(&mut mapper.certd_identityd, &cert);
    Ok(table)
}

pub(super) fn add_inline_device_key(mapper: &mut Mapper, bytes: Vec<u8>) {
    mapper.secrets.push(SecretFile {
        file_name: "device-id".into(),
        contents: bytes,
    });
    mapper
        .keyd_preloaded
        .insert("device-id".into(), secret_uri("device-id"));
    push_unique(&mut mapper.keyd_identityd, "device-id");
}

pub(super) fn device_symmetric_key(
    mapper: &mut Mapper,
    value: Value,
    key: &str,
) -> Result<(), Problem> {
    match parse_symmetric_key(value, key)? {
        SymmetricKey::Inline(bytes) => add_inline_device_key(mapper, bytes),
        SymmetricKey::Uri(uri) => {
            let normalized = keyd_uri(&uri, &format!("{key}.uri"))?;
            mapper.keyd_preloaded.insert("device-id".into(), normalized);
            push_unique(&mut mapper.keyd_identityd, "device-id");
        }
    }
    Ok(())
}

/// What an issued device identity cert looks like, for identityd's settings.
pub(super) struct DeviceCertIssued {
    /// The subject as (attribute, value) pairs; `common_name` becomes `CN`.
    subject: Vec<(String, String)>,
    /// Whether the super-config gave a `subject` table (a DN) rather than a common name.
    subject_is_dn: bool,
    auto_renew: Option<AutoRenew>,
}

impl DeviceCertIssued {
    /// The subject's CN, if it has one.
    fn common_name(&self) -> Option<&str> {
        self.subject
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("CN"))
            .map(|(_, value)| value.as_str())
    }

    /// The subject as a DN table (attribute names upper-case), when the super-config gave a
    /// `subject` table rather than a common name.
    fn dn_table(&self) -> Option<Table> {
        self.subject_is_dn.then(|| {
            self.subject
                .iter()
                .map(|(name, value)| (name.to_uppercase(), string(value)))
                .collect()
        })
    }
}

/// Maps `identity_cert` / `identity_pk` at `key` to the `device-id` cert and key.
pub(super) fn device_cert(
    mapper: &mut Mapper,
    identity_cert: Option<Value>,
    identity_pk: Option<String>,
    key: &str,
    default_common_name: &str,
    renewal_supported: bool,
) -> Result<Option<DeviceCertIssued>, Problem> {
    let cert_key = format!("{key}.identity_cert");
    let cert = identity_cert
        .ok_or_else(|| Problem::new(&cert_key, "is required with method = \"x509\""))?;
    push_unique(&mut mapper.keyd_identityd, "device-id");
    match parse_cert(cert, &cert_key)? {
        CertSpec::File(uri) => {
            let pk = identity_pk.ok_or_else(|| {
                Problem::new(
                    format!("{key}.identity_pk"),
                    "is required when identity_cert is a file",
                )
            })?;
            mapper.preload_cert("device-id", &uri, &cert_key)?;
            mapper.preload_key("device-id", &pk, &format!("{key}.identity_pk"))?;
            Ok(None)
        }
        CertSpec::Issued(options) => {
            if identity_pk.is_some() {
                return Err(Problem::new(
                    format!("{key}.identity_pk"),
                    "must not be set when identity_cert is an issuance table (the key is generated)",
                ));
            }
            let default_cn = (!default_common_name.is_empty()).then_some(default_common_name);
            let table = mapper.issuance("device-id", &options, &cert_key, default_cn)?;
            let auto_renew = match &options.auto_renew {
                Some(renew) => Some(AutoRenew::parse(renew, &format!("{cert_key}.auto_renew"))?),
                None => None,
            };
            let auto_renew = match auto_renew {
                Some(renew) if renewal_supported => Some(renew),
                Some(_) => {
                    mapper.warn(
                        &format!("{cert_key}.auto_renew"),
                        "ignored: identityd renews device identity certs only with DPS",
                    );
                    None
                }
                None => None,
            };
            push_unique(&mut mapper.certd_identityd, "device-id");
            if let Some(renew) = &auto_renew {
                // identityd makes a new key `device-id-temp` only when renewal rotates the key;
                // the new cert is always issued under `device-id-temp` first (as the reference).
                if renew.rotate_key {
                    push_unique(&mut mapper.keyd_identityd, "device-id-temp");
                }
                push_unique(&mut mapper.certd_identityd, "device-id-temp");
                mapper
                    .certd_issuance
                    .insert("device-id-temp".into(), Value::Table(table.clone()));
            }
            mapper
                .certd_issuance
                .insert("device-id".into(), Value::Table(table));
            let (subject, subject_is_dn) = match (&options.common_name, &options.subject) {
                (_, Some(subject)) => (
                    subject
                        .iter()
                        .map(|(name, value)| (name.clone(), value.clone()))
                        .collect(),
                    true,
                ),
                (Some(common_name), None) => (vec![("CN".to_owned(), common_name.clone())], false),
                (None, None) => (
                    default_cn
                        .map(|common_name| vec![("CN".to_owned(), common_name.to_owned())])
                        .unwrap_or_default(),
                    false,
                ),
            };
            Ok(Some(DeviceCertIssued {
                subject,
                subject_is_dn,
                auto_renew,
            }))
        }
    }
}
