"""`kit serve --workers N`: one process accepts connections and hands each to the worker holding the fewest.

uvicorn's own workers share one listening socket, and asyncio accepts every connection that is waiting when its
process wakes: 8 keep-alive clients opening together all landed on one worker, which served them on one core while
the other idled (bench/serve.py: 25 req/s with 1.1 of 2 cores busy). SO_REUSEPORT spreads connections by a hash, so
8 can still split 6 to 2. Here the supervisor accepts, and passes the connection's file descriptor (SCM_RIGHTS over a
Unix socket pair) to the worker with the fewest open connections; the worker serves it with uvicorn's own protocol.
Only the accept crosses processes: requests and answers go straight between client and worker.
"""

from __future__ import annotations

import asyncio
import selectors
import signal
import socket
import sys
import time

FD_PASSING = hasattr(socket, "send_fds") and sys.platform.startswith("linux")


def _listen(host: str, port: int) -> socket.socket:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
    sock.listen(2048)
    return sock


def serve_workers(n: int, host: str, port: int, *, log_level: str, http: str, announce) -> int:
    """Run n worker processes behind one accepting process until SIGINT/SIGTERM (exit status 0), or until a worker
    stops on its own (a bundle it could not load, say: status 1, the others are stopped). `announce(url)` is called
    once every worker is ready."""
    import multiprocessing as mp

    try:
        listener = _listen(host, port)
    except OSError as err:
        print(f"kit serve: cannot listen on {host}:{port} ({err.strerror})", file=sys.stderr)
        return 1
    ctx = mp.get_context("spawn")
    closed = ctx.RawArray("q", n)  # closed[i]: connections worker i has closed; only worker i writes it
    ready = ctx.RawArray("b", n)
    channels = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]
    procs = [ctx.Process(target=_worker, args=(i, ch[1], closed, ready, log_level, http), name=f"kit-serve-{i}")
             for i, ch in enumerate(channels)]
    for p in procs:
        p.start()
    for ch in channels:
        ch[1].close()
    handed = [0] * n  # connections given to each worker; only this process writes it
    stopping: list[int] = []
    old = {s: signal.signal(s, lambda signum, _f: stopping.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    status, announced, turn = 0, False, 0
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    try:
        while not stopping:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                print(f"kit serve: worker {dead[0].name} stopped (exit code {dead[0].exitcode}); stopping the others",
                      file=sys.stderr)
                status = 1
                break
            if not announced and all(ready):
                host_, port_ = listener.getsockname()[:2]
                announce(f"http://{f'[{host_}]' if ':' in host_ else host_}:{port_}")
                announced = True
            if not sel.select(timeout=0.2):
                continue
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as err:  # out of file descriptors, say: the client waits, the server goes on
                    print(f"kit serve: accept failed ({err.strerror})", file=sys.stderr)
                    time.sleep(0.1)  # the socket stays readable: do not spin on it
                    break
                with conn:
                    live = [handed[i] - closed[i] for i in range(n)]
                    fewest = min(live)
                    # the least busy worker; among equals, take turns so idle workers warm up alike
                    i = next(j % n for j in range(turn, turn + n) if live[j % n] == fewest)
                    turn = i + 1
                    try:
                        socket.send_fds(channels[i][0], [b"c"], [conn.fileno()])
                        handed[i] += 1
                    except OSError:
                        pass  # that worker is gone: the loop notices, and this client sees its connection close
    finally:
        sel.close()
        listener.close()
        for p in procs:
            if p.exitcode is None:
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for ch in channels:
            ch[0].close()
        deadline = time.monotonic() + 30
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join()
        for s, h in old.items():
            signal.signal(s, h)
    return status


def _worker(index: int, channel: socket.socket, closed, ready, log_level: str, http: str) -> None:
    import uvicorn

    config = uvicorn.Config("kit.serve.app:app_from_env", factory=True, log_level=log_level, access_log=False, http=http)
    server = _server_class()(config, index=index, channel=channel, closed=closed, ready=ready)
    server.run(sockets=[])


def _server_class():
    import uvicorn

    class HandedServer(uvicorn.Server):
        """uvicorn's server, fed connections from the supervisor instead of a listening socket."""

        def __init__(self, config, *, index: int, channel: socket.socket, closed, ready) -> None:
            super().__init__(config)
            self.index, self.channel, self.closed, self.ready = index, channel, closed, ready

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=[])  # the app starts (lifespan); no socket of its own
            if self.should_exit:
                return
            loop = asyncio.get_running_loop()
            config, index, closed = self.config, self.index, self.closed

            def protocol():
                proto = config.http_protocol_class(config=config, server_state=self.server_state,
                                                   app_state=self.lifespan.state)
                lost = proto.connection_lost

                def connection_lost(exc) -> None:
                    closed[index] += 1
                    lost(exc)

                proto.connection_lost = connection_lost
                return proto

            async def attach(conn: socket.socket) -> None:
                conn.setblocking(False)
                try:
                    await loop.connect_accepted_socket(protocol, conn)
                except OSError:  # the client left before it was served
                    conn.close()

            def receive() -> None:
                try:
                    msg, fds, _, _ = socket.recv_fds(self.channel, 64, 64)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    msg, fds = b"", []
                for fd in fds:
                    loop.create_task(attach(socket.socket(fileno=fd)))
                if not msg:  # the supervisor is gone
                    loop.remove_reader(self.channel.fileno())
                    self.should_exit = True

            self.channel.setblocking(False)
            loop.add_reader(self.channel.fileno(), receive)
            self.ready[index] = 1

        async def shutdown(self, sockets=None) -> None:
            try:
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
            except (ValueError, OSError):
                pass
            await super().shutdown(sockets=sockets)

    return HandedServer

