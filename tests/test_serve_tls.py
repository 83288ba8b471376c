"""`llmcycle serve --ssl-certfile --ssl-keyfile`: https with a self-signed certificate made here (openssl),
the official clients trusting it, plain http refused, a client without the certificate refused, and mutual
TLS (`--ssl-ca-certs`) turning away a client without its own certificate."""

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.errors import ConfigError
from llmcycle.serve.config import ServeConfig

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _self_signed(out, name: str) -> tuple[str, str]:
    cert, key = out / f"{name}.pem", out / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


@contextlib.contextmanager
def _serve(model_dir: str, *flags: str):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle.cli", "serve", f"m={model_dir}", "--port", str(port),
                             "--threads", "1", "--log-level", "warning", "--request-log", "off", *flags],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # listening: a TCP connect succeeds
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def test_https_with_a_self_signed_certificate(tiny_data, tmp_path):
    torch.set_num_threads(1)
    model_dir = make_serving_model(tiny_data["tokenizer"], tmp_path / "model")
    cert, key = _self_signed(tmp_path, "server")
    with _serve(model_dir, "--ssl-certfile", cert, "--ssl-keyfile", key) as port:
        url = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=cert)
        assert httpx.get(url + "/health", verify=trust).json() == {"status": "ok"}
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=trust))
        assert client.completions.create(model="m", prompt="def", max_tokens=3).usage.completion_tokens == 3
        ac = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(verify=trust))
        assert ac.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
                                  ).usage.output_tokens == 2
        with pytest.raises(httpx.ConnectError):  # the certificate is not one the system trusts
            httpx.get(url + "/health")
        with pytest.raises(httpx.HTTPError):  # plain http on the TLS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_mutual_tls_requires_a_client_certificate(tiny_data, tmp_path):
    torch.set_num_threads(1)
    model_dir = make_serving_model(tiny_data["tokenizer"], tmp_path / "model")
    cert, key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "client")
    with _serve(model_dir, "--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ca-certs", client_cert) as port:
        url = f"https://127.0.0.1:{port}/health"
        with_cert = ssl.create_default_context(cafile=cert)
        with_cert.load_cert_chain(client_cert, client_key)
        assert httpx.get(url, verify=with_cert).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=ssl.create_default_context(cafile=cert))


def test_tls_settings_are_checked(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="both"):
        ServeConfig(models=["m"], ssl_certfile=str(cert)).validate()
    with pytest.raises(ConfigError, match="no such file"):
        ServeConfig(models=["m"], ssl_certfile=str(cert), ssl_keyfile=str(tmp_path / "missing")).validate()
    assert ServeConfig(models=["m"]).ssl_args() == {}
