//! mTLS: no client certificate, or one from another CA, is refused at the TLS layer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kluis_tests::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn endpoint(server: &Server, identity: Option<Identity>) -> Endpoint {
    let ca = std::fs::read(server.data_dir().join("pki/ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap()
}

async fn health(ep: Endpoint) -> Result<(), String> {
    let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(ch)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|_| ())
        .map_err(|s| format!("status {:?}: {}", s.code(), s.message()))
}

fn identity_of(server: &Server, name: &str) -> Identity {
    let d = server.data_dir().join("pki/clients");
    Identity::from_pem(std::fs::read(d.join(format!("{name}.pem"))).unwrap(), std::fs::read(d.join(format!("{name}.key"))).unwrap())
}

#[tokio::test]
async fn health_and_reflection_are_served_for_grpcurl() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = Server::start();
    let ch = endpoint(&server, Some(identity_of(&server, "auditor"))).connect().await.unwrap();
    for service in ["", "kluis.v1.KeyService", "kluis.v1.AdminService"] {
        let r = HealthClient::new(ch.clone()).check(HealthCheckRequest { service: service.into() }).await.unwrap();
        assert_eq!(r.into_inner().status, 1, "{service:?} should be SERVING");
    }
    let err = HealthClient::new(ch.clone()).check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = ServerReflectionClient::new(ch).server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let msg = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("unexpected reflection answer") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["kluis.v1.KeyService", "kluis.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}

#[tokio::test]
async fn tls_layer_requires_a_client_certificate_from_the_configured_ca() {
    let server = Server::start();
    let other = Server::start();

    // Control: a certificate from this server's CA gets through.
    health(endpoint(&server, Some(identity_of(&server, "auditor")))).await.unwrap();

    // No client certificate at all.
    let err = health(endpoint(&server, None)).await.unwrap_err();
    assert!(!err.contains("PermissionDenied") && !err.contains("Unauthenticated"), "refused above TLS: {err}");

    // A certificate signed by another CA (the other server's dev CA).
    let err = health(endpoint(&server, Some(identity_of(&other, "dev")))).await.unwrap_err();
    assert!(!err.contains("PermissionDenied") && !err.contains("Unauthenticated"), "refused above TLS: {err}");

    // The same through backup-hook: non-zero exit, a message, nothing sealed.
    let cfg = server.dir.path().join("foreign.toml");
    let text = std::fs::read_to_string(server.client("sealer")).unwrap();
    let other_clients = other.data_dir().join("pki/clients");
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("cert =") {
                format!("cert = \"{}\"", other_clients.join("sealer.pem").display())
            } else if l.starts_with("key =") {
                format!("key = \"{}\"", other_clients.join("sealer.key").display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&cfg, text).unwrap();
    // TLS 1.3: the server refuses the certificate after the client has started its
    // request; the server's orderly close lets the client read the alert every time
    // (refused, exit 4), not a bare closed connection (which is exit 3, "retry later").
    for _ in 0..10 {
        let out = run("backup-hook", &["--client-config", cfg.to_str().unwrap(), "seal", "--keyring", "default", "--backup-id", "x"], b"data");
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
        assert!(stderr(&out).contains("client's certificate is signed by the server's client CA"), "{}", stderr(&out));
        assert!(stderr(&out).contains("alert"), "{}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1);
    }
    // The server logs refused handshakes with the peer and the reason (at most one line per 10 s).
    let log = server.log();
    let line = log.lines().find(|l| l.contains("TLS handshake refused")).unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(line.contains("peer=127.0.0.1:") && line.contains("reason="), "{line}");
}
