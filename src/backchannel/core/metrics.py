"""Prometheus metrics of the relay; served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS = Gauge("backchannel_sessions", "Live device sessions on this node", ["transport"])
CALLS_OK = Counter("backchannel_calls_ok", "Calls answered by the device")
CALLS = Counter("backchannel_calls_failed", "Calls that failed, by outcome", ["outcome"])
EVENTS = Counter("backchannel_events", "Upstream events received from devices")
EVENTS_STORED = Counter("backchannel_events_stored", "Events written to the event log")
EVENTS_DROPPED = Counter(
    "backchannel_events_dropped", "Events the event log could not store, by reason", ["reason"]
)
EVENT_LOG_CONGESTED = Counter(
    "backchannel_event_log_congested",
    "Times the event backlog grew so large that devices stopped being read until it shrank",
)
EVENT_STREAMS = Gauge("backchannel_event_streams", "Live event stream subscribers on this node")
EVENT_STREAMS_DROPPED = Counter(
    "backchannel_event_streams_dropped", "Event stream subscribers dropped for reading too slowly"
)
PROTOCOL_ERRORS = Counter(
    "backchannel_protocol_errors", "Sessions closed for breaking the protocol", ["transport"]
)
LATE_REPLIES = Counter("backchannel_late_replies", "Replies that arrived after their call ended")
TUNNEL_CLIENTS = Gauge("backchannel_tunnel_clients", "Connected tunnel clients", ["kind"])
TUNNEL_REQUESTS = Counter(
    "backchannel_tunnel_requests", "Public requests through tunnels, by outcome", ["outcome"]
)
MESSAGES_QUEUED = Gauge(
    "backchannel_messages_queued", "Queued messages waiting for their devices (this node's count)"
)
MESSAGES_FINAL = Counter(
    "backchannel_messages_final", "Queued messages that reached a final state, by state", ["state"]
)
TOPIC_PUBLISHES = Counter("backchannel_topic_publishes", "Messages published to topics")
TOPIC_PUSHES = Counter(
    "backchannel_topic_pushes", "PUSH frames sent to subscribed devices, by outcome", ["outcome"]
)
FANOUTS = Counter("backchannel_fanouts", "Fan-out calls")
