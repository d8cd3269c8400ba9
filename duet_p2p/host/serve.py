"""``duet-host serve``: run a host from its host.toml until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from duet_p2p.host.admin import HostAdmin
from duet_p2p.host.config import HostConfig, load_config
from duet_p2p.host.control import ControlServer, socket_path
from duet_p2p.host.datasets import host_kwargs, load_dataset
from duet_p2p.host.host import Host
from duet_p2p.host.launch import new_host

log = logging.getLogger("duet_p2p.host")


def host_from_config(config: HostConfig) -> Host:
    """A Host as host.toml describes it, its datasets loaded (not yet started)."""
    s = config.settings
    host = new_host(
        s.signaling_url, name=s.name, admit=s.admit, data_dir=s.data_dir,
        limits=config.limits, min_aggregation=s.min_aggregation,
        keep_released=s.keep_released_seconds, request_expiry=s.request_expiry_seconds,
        max_scientists=s.max_scientists, max_pending_admissions=s.max_pending_admissions,
        ice_servers=None if s.ice_servers is None else [dict(e) for e in s.ice_servers],
        host_addresses=None if s.host_addresses is None else list(s.host_addresses),
        jobs=config.jobs, registry=config.registry,
    )  # fmt: skip
    try:
        for spec in config.datasets:
            host.owner.host(load_dataset(spec), **host_kwargs(spec))
            log.info("hosting %s from %s", spec.name, spec.path)
        for handler in config.handlers:
            handler.add_to(host.owner.requests)
    except BaseException:
        host.state.close()
        if host._jobs is not None:
            host._jobs.close_files()
        raise
    return host


def _apply_budgets(host: Host, config: HostConfig) -> None:
    for budget in config.budgets:
        if budget.total:
            host.dp.set_total_budget(budget.dataset, budget.epsilon, budget.delta)
        else:
            host.dp.set_budget(budget.dataset, budget.epsilon, budget.delta, budget.client_id)


async def run_host(config: HostConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set: the host, and its control socket."""
    host = host_from_config(config)
    await host.start()
    _apply_budgets(host, config)
    control = ControlServer(socket_path(config.host_dir), HostAdmin(host))
    try:
        await control.start()
        log.info("host %s serving; control socket %s", host.id, control.path)
        print(f"Host ID: {host.id}", flush=True)
        await stop.wait()
        log.info("stopping: finishing replies, closing sessions")
    finally:
        await control.close()
        await host.aclose()
    log.info("stopped cleanly")


def serve(config_path: Path) -> int:
    """Load ``config_path``, serve until SIGTERM/SIGINT, shut down cleanly; exit status."""
    config = load_config(config_path)
    logging.basicConfig(
        level=config.settings.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    for noisy in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_host(config, stop)

    asyncio.run(main())
    return 0
