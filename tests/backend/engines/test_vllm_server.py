"""engine=vllm_server (rlkit.backend.engines.vllm_server) without a vLLM server: a URL that
answers as something else (a web page) is named. Against a real vLLM server:
tests/e2e/test_vllm.py."""

import pytest


def test_a_server_that_answers_html_is_named_with_its_url(tmp_path):
    """`engine.url` pointing at something that is not vLLM (a web page on the port)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import rlkit
    from rlkit.backend.engines.vllm_server import ServerError

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>It works!</html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        service = rlkit.ServiceClient(
            device="cpu", engine="vllm_server", engine_options={"url": url}
        )
        trainer = service.create_lora_training_client("rlkit-tiny", rank=4, seed=0)
        with pytest.raises(ServerError) as info:
            trainer.save_weights_and_get_sampling_client()
    finally:
        server.shutdown()
    message = str(info.value)
    assert message.startswith(f"engine=vllm_server: {url}/v1/models did not answer as vLLM's")
    assert "'<html>It works!</html>'" in message and "rlkit.serve" in message
