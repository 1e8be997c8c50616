"""The proxies an operator would pick instead of the appliance: nginx's and Dovecot's.

Both run from Debian's packages with configs written into a temporary folder, bound to
loopback, and reach the backend Dovecot of the benchmark.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from benchmarks.candidates import HOST, Backend, Candidate, Endpoint
from benchmarks.procinfo import process_tree
from tests.support.appliance import free_port, wait_for_port
from tests.support.certs import CertFiles

NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
# Connections per nginx worker; a proxied session uses two.
NGINX_WORKER_CONNECTIONS = 8192


class _ServerProcess:
    """A peer server run as a child process, with its files in a temporary folder."""

    process: subprocess.Popen[bytes] | None
    root: Path | None

    def _spawn(
        self, command: list[str], ports: Iterable[int], log_file: Path, name: str
    ) -> None:
        """Start `command` in its own session and wait until all `ports` accept."""
        assert self.root is not None
        with open(self.root / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            for port in ports:
                wait_for_port(HOST, port)
        except TimeoutError:
            log = log_file.read_text(errors="replace")[-4000:]
            self.stop()
            message = f"{name} did not start; {log_file.name}:\n{log}"
            raise RuntimeError(message) from None

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


class Nginx(_ServerProcess, Candidate):
    """nginx's mail proxy, with its `auth_http` requests served by nginx's http module.

    The responder runs inside the same nginx as a `return` with headers, so no
    interpreter competes with the proxies for the two cores. It accepts every login
    and names the backend port by the `Auth-Protocol` request header; the backend
    checks the password.
    """

    name = "nginx"

    def __init__(self, backend: Backend, listener_cert: CertFiles) -> None:
        self.backend = backend
        self.listener_cert = listener_cert
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.ports = {
            ("imap", "plain"): free_port(),
            ("pop3", "plain"): free_port(),
            ("imap", "client_tls"): free_port(),
            ("pop3", "client_tls"): free_port(),
        }
        self.auth_port = free_port()

    @staticmethod
    def available() -> str | None:
        """Return why nginx cannot run here, or None when it can."""
        if shutil.which("nginx") is None:
            return "nginx is not installed (apt-get install nginx libnginx-mod-mail)"
        if not NGINX_MAIL_MODULE.exists():
            return "nginx's mail module is missing (apt-get install libnginx-mod-mail)"
        return None

    def render_config(self) -> str:
        assert self.root is not None
        root = self.root
        cert = self.listener_cert
        servers = []
        for (protocol, path), port in self.ports.items():
            ssl = " ssl" if path == "client_tls" else ""
            servers.append(
                f"    server {{\n"
                f"        listen {HOST}:{port}{ssl};\n"
                f"        protocol {protocol};\n"
                f"    }}\n"
            )
        return f"""\
load_module {NGINX_MAIL_MODULE};
worker_processes auto;
worker_rlimit_nofile {NGINX_WORKER_CONNECTIONS * 2};
pid {root}/nginx.pid;
events {{
    worker_connections {NGINX_WORKER_CONNECTIONS};
}}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    map $http_auth_protocol $mail_port {{
        imap {self.backend.port("imap")};
        pop3 {self.backend.port("pop3")};
    }}
    server {{
        listen {HOST}:{self.auth_port};
        location = /auth {{
            add_header Auth-Status OK always;
            add_header Auth-Server {HOST} always;
            add_header Auth-Port $mail_port always;
            return 204;
        }}
    }}
}}
mail {{
    auth_http {HOST}:{self.auth_port}/auth;
    proxy_pass_error_message on;
    imap_auth plain login;
    pop3_auth plain;
    ssl_certificate {cert.cert_file};
    ssl_certificate_key {cert.key_file};
{"".join(servers)}}}
"""

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="appliance-bench-nginx-"))
        config_file = self.root / "nginx.conf"
        config_file.write_text(self.render_config())
        command = [
            "nginx",
            "-p",
            str(self.root),
            "-c",
            str(config_file),
            "-e",
            str(self.root / "error.log"),
            "-g",
            "daemon off;",
        ]
        ports = [*self.ports.values(), self.auth_port]
        self._spawn(command, ports, self.root / "error.log", "nginx")

    def endpoint(self, protocol: str, path: str) -> Endpoint | None:
        # nginx 1.22's mail module cannot speak TLS to its backend.
        port = self.ports.get((protocol, path))
        if port is None:
            return None
        return Endpoint(HOST, port, protocol, path == "client_tls")

    def memory_roots(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid]


class DovecotProxyInstance(_ServerProcess):
    """One Dovecot 2.3 in proxy mode: a static passdb that proxies every login.

    `nopassword=y` makes the proxy accept any password and pass it on, so the backend
    checks it. With `upstream_tls` the proxy connects with implicit TLS and
    `ssl=any-cert`, because Dovecot 2.3 login processes verify against OpenSSL's
    default store only and the benchmark must not add its test CA there.
    """

    def __init__(
        self,
        backend: Backend,
        listener_cert: CertFiles,
        *,
        upstream_tls: bool,
        connection_limit: int,
    ) -> None:
        self.backend = backend
        self.listener_cert = listener_cert
        self.upstream_tls = upstream_tls
        self.connection_limit = connection_limit
        self.root: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s")}

    def render_config(self) -> str:
        assert self.root is not None
        root = self.root
        suffix = "s" if self.upstream_tls else ""
        imap_port = self.backend.port("imap" + suffix)
        pop3_port = self.backend.port("pop3" + suffix)
        tls_fields = " ssl=any-cert" if self.upstream_tls else ""
        limit = self.connection_limit
        services = "".join(
            _login_service(protocol, self.ports, limit) for protocol in ("imap", "pop3")
        )
        return f"""\
instance_name = appliance-bench-proxy-{root.name}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap pop3
listen = {HOST}
default_internal_user = root
default_internal_group = root
default_login_user = {_login_user()}
first_valid_uid = 0
ssl = yes
ssl_cert = <{self.listener_cert.cert_file}
ssl_key = <{self.listener_cert.key_file}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0 secs
passdb {{
  driver = static
  args = proxy=y host={HOST} port=%{{if;%s;eq;imap;{imap_port};{pop3_port}}} nopassword=y{tls_fields}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534
}}
default_client_limit = {limit + 100}
{services}"""

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="appliance-bench-dproxy-"))
        # Login processes run unprivileged and must reach base_dir.
        self.root.chmod(0o755)
        for name in ("run", "state"):
            (self.root / name).mkdir(mode=0o755)
        config_file = self.root / "dovecot.conf"
        config_file.write_text(self.render_config())
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        command = [binary, "-F", "-c", str(config_file)]
        log_file = self.root / "dovecot.log"
        self._spawn(command, self.ports.values(), log_file, "Dovecot proxy")


class DovecotProxy(Candidate):
    """Dovecot in proxy mode: one instance toward plain ports, one toward TLS ports."""

    name = "dovecot-proxy"

    def __init__(
        self, backend: Backend, listener_cert: CertFiles, connection_limit: int
    ) -> None:
        self.plain = DovecotProxyInstance(
            backend,
            listener_cert,
            upstream_tls=False,
            connection_limit=connection_limit,
        )
        self.tls = DovecotProxyInstance(
            backend, listener_cert, upstream_tls=True, connection_limit=connection_limit
        )

    def start(self) -> None:
        self.plain.start()
        try:
            self.tls.start()
        except BaseException:
            self.plain.stop()
            raise

    def stop(self) -> None:
        self.plain.stop()
        self.tls.stop()

    def endpoint(self, protocol: str, path: str) -> Endpoint | None:
        instance = self.tls if path == "upstream_tls" else self.plain
        tls = path == "client_tls"
        port = instance.ports[protocol + ("s" if tls else "")]
        return Endpoint(HOST, port, protocol, tls)

    def memory_roots(self) -> list[int]:
        # The memory workload uses the plain path, so only that instance counts.
        assert self.plain.process is not None
        return [self.plain.process.pid]

    def cpu_roots(self) -> list[int]:
        instances = (self.plain, self.tls)
        return [i.process.pid for i in instances if i.process is not None]


def _login_service(protocol: str, ports: dict[str, int], limit: int) -> str:
    # service_count = 0 lets each login process serve many clients (Dovecot's
    # high-performance mode); proxied sessions stay in the login process.
    return f"""\
service {protocol}-login {{
  inet_listener {protocol} {{
    port = {ports[protocol]}
  }}
  inet_listener {protocol}s {{
    port = {ports[protocol + "s"]}
    ssl = yes
  }}
  service_count = 0
  client_limit = {limit}
  process_min_avail = 2
  process_limit = 4
}}
"""


def _login_user() -> str:
    import pwd

    try:
        pwd.getpwnam("dovenull")
    except KeyError:
        return "nobody"
    return "dovenull"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop a server's master process, then wait for its workers by PID."""
    workers = process_tree(process.pid)[1:]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
