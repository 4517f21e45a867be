"""TLS, mutual TLS and bearer tokens with the Python grpcio client and grpcurl
(certificates made at test time with trustme)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
import trustme
from conftest import VENV_BIN, Server

TOKEN = "py-token-1"


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("a-client")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "tokens": tmp_path / "tokens",
    }
    ca.cert_pem.write_to_path(files["ca"])
    server.private_key_pem.write_to_path(files["key"])
    files["cert"].write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    files["tokens"].write_text(f"{TOKEN}\n")
    files["client_key"] = client.private_key_pem.bytes()
    files["client_chain"] = b"".join(p.bytes() for p in client.cert_chain_pems)
    return files


def grpcurl(*args):
    return subprocess.run([str(Path(VENV_BIN) / "grpcurl"), *args], capture_output=True, text=True, timeout=60)


def test_grpcio_and_grpcurl_over_tls_with_tokens(pb, pki):
    """grpcio and grpcurl connect over TLS; without the token a call is
    UNAUTHENTICATED (health and reflection stay open); with it, it works."""
    pb2, rpc = pb
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    server = Server("--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                    "--auth-token-file", str(pki["tokens"]), credentials=creds)
    try:
        with server.channel() as ch:
            stub = rpc.EmbedderStub(ch)
            request = pb2.EmbedRequest(texts=["def add(a, b): return a + b"])
            with pytest.raises(grpc.RpcError) as missing:
                stub.Embed(request, timeout=30)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as wrong:
                stub.Embed(request, timeout=30, metadata=[("authorization", "Bearer not-it")])
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Embed(request, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert len(ok.embeddings) == 1 and len(ok.embeddings[0].values) > 0

        tls = ["-cacert", str(pki["ca"])]
        out = grpcurl(*tls, server.addr, "list")
        assert out.returncode == 0 and "embedder.v1.Embedder" in out.stdout, out.stderr
        body = json.dumps({"texts": ["x = 1"]})
        out = grpcurl(*tls, "-d", body, server.addr, "embedder.v1.Embedder/Embed")
        assert out.returncode != 0 and "Unauthenticated" in out.stderr, out.stderr
        out = grpcurl(*tls, "-H", f"authorization: Bearer {TOKEN}", "-d", body, server.addr, "embedder.v1.Embedder/Embed")
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["embeddings"]) == 1
        out = grpcurl("-plaintext", server.addr, "list")
        assert out.returncode != 0, "plaintext against a TLS port fails"
    finally:
        server.stop()


def test_grpcio_mutual_tls(pb, pki):
    """With --tls-client-ca a grpcio client without a certificate gets no
    answer; with one signed by the CA it does."""
    pb2, rpc = pb
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(), private_key=pki["client_key"], certificate_chain=pki["client_chain"]
    )
    server = Server("--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                    "--tls-client-ca", str(pki["ca"]), credentials=with_cert)
    try:
        with server.channel() as ch:
            ok = rpc.EmbedderStub(ch).Embed(pb2.EmbedRequest(texts=["hello"]), timeout=30)
            assert len(ok.embeddings) == 1
        without = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(server.addr, without) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                rpc.EmbedderStub(ch).Embed(pb2.EmbedRequest(texts=["hello"]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
