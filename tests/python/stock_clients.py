"""Talks to a running coordinator with stock clients, none of them written in this project:
grpcio's health-checking and reflection clients, a generic call built only from what reflection
returned, and prometheus_client's parser of the text exposition format.

Usage: stock_clients.py --target HOST:PORT --health HOST:PORT --metrics URL --token TOKEN
Prints one line per check; exits 1 on the first failure.
"""

import argparse
import sys
import urllib.request

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families


def check(ok, what):
    if not ok:
        print(f"FAIL {what}", flush=True)
        sys.exit(1)
    print(f"ok   {what}", flush=True)


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--health", required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--token", required=True)
    a = p.parse_args()
    auth = [("authorization", f"Bearer {a.token}")]

    with grpc.insecure_channel(a.target) as ch:
        # Health needs no token (probes carry none).
        check(health(ch, "") == health_pb2.HealthCheckResponse.SERVING, "health of the server on the gRPC port")
        check(health(ch, "sweep.v1.SweepService") == health_pb2.HealthCheckResponse.SERVING, "health of sweep.v1.SweepService")
        check(health(ch, "sweep.v1.WorkerService") == health_pb2.HealthCheckResponse.SERVING, "health of sweep.v1.WorkerService")
        try:
            health(ch, "no.such.Service")
            check(False, "an unknown service is NOT_FOUND")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.NOT_FOUND, f"an unknown service is NOT_FOUND ({e.code()})")

        # Reflection without a token is refused; with one it lists and describes the services.
        try:
            list(ProtoReflectionDescriptorDatabase(ch).get_services())
            check(False, "reflection without a token is refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAUTHENTICATED, f"reflection without a token is UNAUTHENTICATED ({e.code()})")

    class Auth(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            return continuation(_Details(details, auth), request)

        def intercept_stream_stream(self, continuation, details, requests):
            return continuation(_Details(details, auth), requests)

    with grpc.intercept_channel(grpc.insecure_channel(a.target), Auth()) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        for s in ["sweep.v1.SweepService", "sweep.v1.WorkerService", "grpc.health.v1.Health"]:
            check(s in services, f"reflection lists {s}")
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("sweep.v1.SweepService")
        methods = {m.name for m in svc.methods}
        for m in ["SubmitSweep", "GetLeaderboard", "WatchSweep", "ListSweeps"]:
            check(m in methods, f"reflection describes SweepService.{m}")
        # A call built from the reflected descriptors alone.
        list_m = svc.FindMethodByName("ListSweeps")
        req_cls = message_factory.GetMessageClass(list_m.input_type)
        resp_cls = message_factory.GetMessageClass(list_m.output_type)
        call = ch.unary_unary(
            "/sweep.v1.SweepService/ListSweeps",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        resp = call(req_cls(), timeout=5)
        names = [s.name for s in resp.sweeps]
        check(len(names) >= 1, f"ListSweeps through reflection returns the sweeps ({names})")

    with grpc.insecure_channel(a.health) as ch:
        check(health(ch, "") == health_pb2.HealthCheckResponse.SERVING, "health on the plaintext health port")

    text = urllib.request.urlopen(a.metrics, timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("sweep_trials", "gauge"),
        ("sweep_workers", "gauge"),
        ("sweep_sweeps", "gauge"),
        ("sweep_reports", "counter"),
        ("sweep_scheduling_latency_seconds", "histogram"),
        ("sweep_store_write_seconds", "histogram"),
    ]:
        check(name in families and families[name].type == kind, f"/metrics has {name} ({kind})")
    completed = [s.value for s in families["sweep_trials"].samples if s.labels.get("state") == "completed"]
    print(f"metrics: trials completed {completed}, reports_total "
          f"{[s.value for s in families['sweep_reports'].samples if s.name == 'sweep_reports_total']}", flush=True)
    for line in text.splitlines():
        if line.startswith(("sweep_trials{", "sweep_reports_total", "sweep_workers{", "sweep_scheduling_latency_seconds_count")):
            print(f"     {line}", flush=True)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, extra):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = list(d.metadata or []) + extra
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


if __name__ == "__main__":
    main()
