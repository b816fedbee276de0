//! A certificate authority for an environment (rcgen): `cellplane certs generate`
//! makes one and every certificate `cells/` needs; `cellplane certs issue` adds
//! one for a tenant or an operator.
//!
//! Keys are ECDSA P-256. Every leaf certificate may serve and may dial (both
//! extended key usages), names its hosts (DNS names and IP addresses) for server
//! verification, and carries its identity as a `cellplane://` URI.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that can issue certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks slightly behind the issuer's.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

impl Authority {
    /// A new self-signed CA named `name`, valid for `days`.
    pub fn generate(name: &str, days: u32) -> Result<Authority, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Authority {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA from its PEM certificate and key (as written by [`Authority::generate`]).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Authority {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `identity`, valid for `days`, for the given hosts (DNS
    /// names or IP addresses a client dials it by; empty for a pure client).
    pub fn issue(
        &self,
        identity: &Identity,
        hosts: &[String],
        days: u32,
    ) -> Result<Issued, CertError> {
        let uri = identity
            .uri()
            .ok_or_else(|| CertError::Invalid("an anonymous identity has no certificate".into()))?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params
            .subject_alt_names
            .push(SanType::URI(uri.as_str().try_into()?));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_string());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::first_pem_block;

    #[test]
    fn issued_certificates_name_their_identity() {
        let ca = Authority::generate("test CA", 30).unwrap();
        let id = Identity::Member {
            cell: "alpha".into(),
            id: 2,
        };
        let issued = ca
            .issue(&id, &["127.0.0.1".into(), "alpha-1.alpha".into()], 30)
            .unwrap();
        let der = first_pem_block(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_certificate(&der), Ok(id));

        // A CA loaded back issues certificates too.
        let again = Authority::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        let t = again
            .issue(&Identity::Tenant("acme".into()), &[], 1)
            .unwrap();
        let der = first_pem_block(t.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            Identity::from_certificate(&der),
            Ok(Identity::Tenant("acme".into()))
        );
        assert!(ca.issue(&Identity::Anonymous, &[], 1).is_err());
    }

    #[test]
    fn a_certificate_without_a_cellplane_uri_proves_nothing() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            Identity::from_certificate(cert.der()),
            Err(crate::identity::IdentityError::NoIdentity)
        );
    }
}
