"""The ``backchannel`` command group."""

from __future__ import annotations

import click

from backchannel import __version__
from backchannel.cli.apps import apps, devices
from backchannel.cli.device_agent import device
from backchannel.cli.expose import expose
from backchannel.cli.publish import publish
from backchannel.cli.send import send
from backchannel.cli.serve import serve


@click.group()
@click.version_option(__version__, prog_name="backchannel")
def cli() -> None:
    """backchannel: reach devices and services behind NAT through one outbound connection."""


cli.add_command(serve)
cli.add_command(apps)
cli.add_command(devices)
cli.add_command(send)
cli.add_command(publish)
cli.add_command(device)
cli.add_command(expose)


def main() -> None:
    """Console-script entry point."""
    cli()
