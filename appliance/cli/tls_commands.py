"""`appliance probe` and `appliance known-servers`: the TLS modes of mail servers."""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
import sys
from pathlib import Path

from appliance.cli.common import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILURE,
    EXIT_OK,
    _add_config_options,
    _load,
)


def _add_probe_command(commands: argparse._SubParsersAction) -> None:
    probe = commands.add_parser(
        "probe",
        help="show which TLS modes a mail server offers (implicit, starttls, none); "
        "changes nothing",
    )
    probe.add_argument("host", type=_host_argument, help="host name or IP address")
    probe.add_argument(
        "--port",
        type=_port_argument,
        help="probe every mode on this one port (default: 993/143 for IMAP, 995/110 "
        "for POP3)",
    )
    probe.add_argument("--protocol", choices=("imap", "pop3"), default="imap")
    probe.add_argument("--ca-file", metavar="PATH", help="PEM CA certificates to trust")
    probe.add_argument(
        "--server-name",
        metavar="NAME",
        help="name for SNI and verification (default: HOST)",
    )
    probe.add_argument(
        "--no-verify", action="store_true", help="skip certificate verification"
    )
    probe.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds allowed for each connection (default: 10)",
    )
    probe.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_known_servers_command(commands: argparse._SubParsersAction) -> None:
    known = commands.add_parser(
        "known-servers",
        help="list or edit the TLS modes that tls: auto learned; a running appliance "
        "uses changes from its next session",
    )
    actions = known.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="print every record")
    listing.add_argument(
        "--json", action="store_true", help="print the records as JSON"
    )
    forget = actions.add_parser(
        "forget", help="remove the records of HOST, so the next session probes it again"
    )
    pin = actions.add_parser(
        "pin", help="set the mode of HOST by hand; probes never change a pinned record"
    )
    forget.add_argument("host", type=_host_argument)
    pin.add_argument("host", type=_host_argument)
    pin.add_argument("mode", choices=("implicit", "starttls", "none"))
    for parser in (forget, pin):
        parser.add_argument(
            "--port",
            type=_port_argument,
            help="only the records of this port, the upstream's configured port or "
            "the port its mode connects to (default: every port of HOST)",
        )
        parser.add_argument(
            "--protocol", choices=("imap", "pop3"), help="default: both protocols"
        )
    for parser in (listing, forget, pin):
        _add_config_options(parser)
        parser.add_argument(
            "--state-dir",
            metavar="DIR",
            help="folder of known_servers.json (default: state_dir of the config)",
        )


def _host_argument(value: str) -> str:
    from appliance.config.models import normalize_host

    try:
        return normalize_host(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port_argument(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a port; expected 1 to 65535"
        )
    return int(value)


def command_probe(args: argparse.Namespace) -> int:
    """Print what the server offers; exit 1 only when no connection succeeded."""
    import ssl

    from appliance.tls import pem, probe

    try:
        context = probe.probe_client_context(args.ca_file, verify=not args.no_verify)
    except (OSError, ssl.SSLError) as exc:
        expected = "one or more PEM CA certificates"
        problem = pem.certificate_file_problem(Path(args.ca_file), expected=expected)
        if problem is None:
            problem = (
                f"contains no usable CA certificate ({pem.load_error_reason(exc)}); "
                f"expected {expected}"
            )
        print(f"--ca-file {args.ca_file!r} {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    settings = probe.ProbeSettings(
        host=args.host,
        protocol=args.protocol,
        port=args.port,
        context=context,
        server_name=args.server_name or args.host,
        timeout=args.timeout,
        inspect_context=probe.inspection_context(),
    )
    report = asyncio.run(probe.probe_server(settings))
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(probe.format_report(report))
    if not report.reachable:
        print(f"could not probe {args.host}: no connection succeeded", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def command_known_servers(args: argparse.Namespace) -> int:
    """Run `known-servers list|forget|pin` on the store file."""
    from appliance.logs import configure_logging
    from appliance.tls import known_servers

    configure_logging("WARNING")
    state_dir = _state_dir(args)
    if state_dir is None:
        return EXIT_CONFIG_ERROR
    store = known_servers.KnownServerStore(state_dir)
    try:
        if args.action != "pin":
            # Listing or forgetting records never creates the folder, so a mistyped
            # path fails instead of leaving an empty folder behind.
            _check_state_dir_exists(state_dir)
        if args.action == "list":
            return _list_known_servers(store, as_json=args.json)
        known_servers.prepare_state_dir(state_dir)
        if args.action == "forget":
            return _forget_known_server(store, args)
        return _pin_known_server(store, args)
    except (
        known_servers.StateDirError,
        known_servers.StoreReadError,
        known_servers.StoreWriteError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _state_dir(args: argparse.Namespace) -> Path | None:
    if args.state_dir:
        return Path(args.state_dir)
    # Only state_dir is read, so a config that sets nothing else will do.
    loaded = _load(args, require_listeners=False)
    return None if loaded is None else loaded.config.state_dir


def _check_state_dir_exists(state_dir: Path) -> None:
    """Raise StateDirError unless `state_dir` is an existing folder."""
    from appliance.tls.known_servers import StateDirError

    hint = "check --state-dir, or state_dir in the config"
    try:
        mode = state_dir.stat().st_mode
    except FileNotFoundError:
        message = f"state_dir {str(state_dir)!r} does not exist; {hint}"
        raise StateDirError(message) from None
    except OSError as exc:
        raise StateDirError(
            f"state_dir {str(state_dir)!r} cannot be read: {exc.strerror}; {hint}"
        ) from None
    if not stat.S_ISDIR(mode):
        raise StateDirError(f"state_dir {str(state_dir)!r} is not a folder; {hint}")


def _list_known_servers(store, *, as_json: bool) -> int:
    from appliance.tls.known_servers import format_records

    store.refresh(repair=False)
    records = store.records()
    if as_json:
        data = [record.model_dump(mode="json") for record in records]
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    elif not records:
        print(f"no known servers in {store.path}")
    else:
        sys.stdout.write(format_records(records))
    return EXIT_OK


def _forget_known_server(store, args: argparse.Namespace) -> int:
    removed = store.forget(args.host, port=args.port, protocol=args.protocol)
    if not removed:
        print(f"no record matches {args.host} in {store.path}", file=sys.stderr)
        return EXIT_FAILURE
    for record in removed:
        print(f"forgot {record.key} ({record.mode}); the next session probes it again")
    return EXIT_OK


def _pin_known_server(store, args: argparse.Namespace) -> int:
    from appliance.config.models import default_port
    from appliance.tls.known_servers import ServerKey

    for protocol in [args.protocol] if args.protocol else ["imap", "pop3"]:
        key = ServerKey(protocol, args.host, args.port)
        port = args.port or default_port(protocol, args.mode)
        store.pin(key, args.mode, port)
        print(f"pinned {key} to {args.mode} (port {port})")
    return EXIT_OK
