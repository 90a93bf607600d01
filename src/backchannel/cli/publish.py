"""``backchannel publish``: push a message to the devices subscribed to a topic."""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import quote

import click
import orjson

from backchannel.cli.output import print_json
from backchannel.cli.send import app_credentials, authorization_header, post_bytes, report_error


@click.command()
@click.argument("app_id", metavar="APP")
@click.argument("topic")
@click.argument("body", required=False)
@app_credentials
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the body from standard input.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer.")
@click.pass_context
def publish(
    ctx: click.Context,
    app_id: str,
    topic: str,
    body: str | None,
    secret: str | None,
    admin_token: str | None,
    server: str,
    from_stdin: bool,
    as_json: bool,
) -> None:
    """Push BODY to every connected device subscribed to a pattern matching TOPIC.

    Prints how many devices got it. Offline devices miss it: topics keep nothing.
    """
    authorization = authorization_header(server, secret, admin_token)
    if from_stdin == (body is not None):
        raise click.UsageError("give the BODY argument or --stdin, one of the two")
    payload = sys.stdin.buffer.read() if from_stdin else (body or "").encode()
    # Levels stay levels: '/' is the topic's separator, the rest is quoted.
    path = f"/v1/applications/{quote(app_id, safe='')}/topics/{quote(topic, safe='/')}"
    headers = {"Authorization": authorization, "Content-Type": "application/octet-stream"}
    result = asyncio.run(post_bytes(server, path, payload, headers))
    if result.status != 200:
        report_error(ctx, result, as_json)
        return
    answer = orjson.loads(result.body)
    if as_json:
        print_json(answer)
    else:
        click.echo(f"{answer['devices']} device(s) got it")
