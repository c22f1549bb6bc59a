"""A local OTLP trace receiver for tests: HTTP/protobuf (``POST /v1/traces``) and gRPC
(``TraceService/Export``), decoding what the exporter sends with OpenTelemetry's own
protobuf definitions."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict
    events: list[tuple[str, int, dict]]
    service_name: str


def _value(v) -> object:  # noqa: ANN001 - an AnyValue
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:  # noqa: ANN001
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Store:
    spans: list[Span] = field(default_factory=list)
    num_exports: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, req: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            self.num_exports += 1
            for rs in req.resource_spans:
                service = _attrs(rs.resource.attributes).get("service.name", "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            Span(
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.name,
                                s.start_time_unix_nano,
                                s.end_time_unix_nano,
                                _attrs(s.attributes),
                                [
                                    (e.name, e.time_unix_nano, _attrs(e.attributes))
                                    for e in s.events
                                ],
                                service,
                            )
                        )

    def wait_for(self, pred, timeout: float = 30.0) -> list[Span]:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = list(self.spans)
            if pred(spans):
                return spans
            time.sleep(0.1)
        with self.lock:
            return list(self.spans)


class HttpReceiver:
    def __init__(self) -> None:
        self.store = Store()
        store = self.store

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                store.add(req)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcReceiver:
    def __init__(self) -> None:
        import grpc

        self.store = Store()
        store = self.store

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802, ANN001
                store.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.stop(0)
