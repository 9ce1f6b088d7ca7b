"""Start the real ComfyUI server (the one in .comfyui/) as a subprocess and run API-format prompts.

No pytest dependency: used by scripts/demo.py and tests/e2e.

    with ComfyServer(models_dir="/tmp/models", work_dir="/tmp/run") as server:
        result = server.run_prompt(prompt)          # raises on validation or execution errors
        print(result.seconds, result.peak_rss_mib, result.output_files)

`models_dir` is a folder with diffusion_models/, text_encoders/ (or clip/) and vae/ subfolders; it is
given to ComfyUI through an extra_model_paths yaml. Output, input, temp and user folders (and the
server log) go under `work_dir`, so nothing is written into .comfyui/.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_DIR = os.environ.get("QUANTDIT_COMFYUI", os.path.join(ROOT, ".comfyui"))
DEFAULT_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
MODEL_SUBFOLDERS = ("diffusion_models", "text_encoders", "clip", "vae")


class ComfyServerError(RuntimeError):
    """The server did not start, died, or answered an HTTP request with an error."""


class PromptValidationError(ComfyServerError):
    """POST /prompt refused the prompt (the node_errors ComfyUI reports before running anything)."""

    def __init__(self, message: str, response: dict):
        super().__init__(message)
        self.response = response


class PromptExecutionError(ComfyServerError):
    """The prompt was queued but a node raised while running (history status 'error')."""

    def __init__(self, message: str, history: dict, error: Optional[dict]):
        super().__init__(message)
        self.history = history
        self.error = error or {}
        self.exception_message = self.error.get("exception_message", "")
        self.node_type = self.error.get("node_type")


@dataclass
class PromptResult:
    prompt_id: str
    history: dict                      # the /history/<prompt_id> entry
    seconds: Optional[float]           # execution_start -> execution_success, from the status messages
    peak_rss_bytes: Optional[int]      # server VmHWM after the prompt (reset just before it when possible)
    peak_rss_reset: bool               # True when the peak was reset before the prompt (per-prompt peak)
    rss_before_bytes: Optional[int] = None  # server RSS when the prompt was queued
    output_files: list[str] = field(default_factory=list)  # absolute paths of files the outputs report

    @property
    def peak_rss_mib(self) -> Optional[float]:
        return None if self.peak_rss_bytes is None else self.peak_rss_bytes / 2 ** 20

    @property
    def rss_before_mib(self) -> Optional[float]:
        return None if self.rss_before_bytes is None else self.rss_before_bytes / 2 ** 20


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_extra_model_paths(yaml_path: str, models_dir: str, name: str = "quantdit") -> str:
    """The extra_model_paths.yaml format of .comfyui/extra_model_paths.yaml.example."""
    models_dir = os.path.abspath(models_dir)
    for sub in MODEL_SUBFOLDERS:
        os.makedirs(os.path.join(models_dir, sub), exist_ok=True)
    text = (f"{name}:\n"
            f"  base_path: {json.dumps(models_dir)}\n"
            f"  is_default: true\n"  # what the server writes into models/ (Save Quantized DiT) lands here
            f"  diffusion_models: diffusion_models/\n"
            f"  text_encoders: |\n"
            f"    text_encoders/\n"
            f"    clip/\n"
            f"  vae: vae/\n")
    with open(yaml_path, "w", encoding="utf-8") as f:
        f.write(text)
    return yaml_path


def _parent_death_signal():
    """In the child: get SIGTERM if the parent dies, so a killed demo/pytest leaves no server behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _proc_status_kib(pid: int, field_name: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def read_peak_rss(pid: int) -> Optional[int]:
    """VmHWM (peak resident set size) of a process, in bytes."""
    peak = _proc_status_kib(pid, "VmHWM")
    if peak is not None:
        return peak
    try:  # not Linux: psutil's peak where the OS keeps one (Windows), else the current RSS
        import psutil
        mem = psutil.Process(pid).memory_info()
        return getattr(mem, "peak_wset", None) or mem.rss
    except Exception:
        return None


def read_rss(pid: int) -> Optional[int]:
    rss = _proc_status_kib(pid, "VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss
    except Exception:
        return None


def reset_peak_rss(pid: int) -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS. False where that is not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class ComfyServer:
    def __init__(self, models_dir: str, work_dir: str, port: Optional[int] = None,
                 python: Optional[str] = None, comfy_dir: str = COMFY_DIR, extra_args: tuple = ()):
        self.models_dir = os.path.abspath(models_dir)
        self.work_dir = os.path.abspath(work_dir)
        self.comfy_dir = comfy_dir
        self.python = python or (DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable)
        self.port = port
        self.extra_args = tuple(extra_args)
        self.output_dir = os.path.join(self.work_dir, "output")
        self.input_dir = os.path.join(self.work_dir, "input")
        self.temp_dir = os.path.join(self.work_dir, "temp")
        self.user_dir = os.path.join(self.work_dir, "user")
        self.yaml_path = os.path.join(self.work_dir, "extra_model_paths.yaml")
        self.log_path = os.path.join(self.work_dir, "comfyui.log")
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--extra-model-paths-config", self.yaml_path,
                "--output-directory", self.output_dir, "--input-directory", self.input_dir,
                "--temp-directory", self.temp_dir, "--user-directory", self.user_dir,
                # keep ComfyUI's sqlite database out of .comfyui/user, and stay offline
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args]

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise ComfyServerError(f"ComfyUI not found at {self.comfy_dir}: run `make setup` first")
        if self.proc is not None:
            raise ComfyServerError("server already started")
        for d in (self.output_dir, self.input_dir, self.temp_dir, self.user_dir):
            os.makedirs(d, exist_ok=True)
        write_extra_model_paths(self.yaml_path, self.models_dir)
        if self.port is None:
            self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     preexec_fn=_parent_death_signal if sys.platform.startswith("linux") else None)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} while starting.\n"
                                       f"--- last lines of {self.log_path} ---\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last_error = e
            time.sleep(0.5)
        raise ComfyServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s ({last_error}).\n"
                               f"--- last lines of {self.log_path} ---\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            return e.code, payload
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            raise ComfyServerError(f"{method} {path} failed: {e}\n"
                                   f"--- last lines of {self.log_path} ---\n{self.log_tail()}") from e

    def get_json(self, path: str):
        status, payload = self._request("GET", path)
        if status != 200:
            raise ComfyServerError(f"GET {path} answered {status}: {payload}")
        return payload

    def object_info(self, node_type: Optional[str] = None) -> dict:
        if node_type is None:
            return self.get_json("/object_info")
        return self.get_json(f"/object_info/{node_type}").get(node_type, {})

    def free(self, unload_models: bool = True, free_memory: bool = True, settle: float = 1.0):
        """Ask the prompt worker to unload models and drop its node cache before the next prompt."""
        status, payload = self._request("POST", "/free", {"unload_models": unload_models,
                                                          "free_memory": free_memory})
        if status != 200:
            raise ComfyServerError(f"POST /free answered {status}: {payload}")
        time.sleep(settle)  # the worker applies the flags asynchronously as soon as it is idle

    def queue_prompt(self, prompt: dict) -> str:
        status, payload = self._request("POST", "/prompt", {"prompt": prompt})
        if status != 200 or not isinstance(payload, dict) or "prompt_id" not in payload:
            raise PromptValidationError(format_validation_error(status, payload),
                                        payload if isinstance(payload, dict) else {"raw": payload})
        if payload.get("node_errors"):
            raise PromptValidationError(format_validation_error(status, payload), payload)
        return payload["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("status_str") in ("success", "error"):
                break
            if self.proc is None or self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI died while running prompt {prompt_id}.\n"
                                       f"--- last lines of {self.log_path} ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n"
                                       f"--- last lines of {self.log_path} ---\n{self.log_tail()}")
            time.sleep(poll)
        if status["status_str"] == "error" or not status.get("completed", False):
            error = next((data for event, data in status.get("messages", []) if event == "execution_error"),
                         None)
            if error:
                msg = (f"node {error.get('node_id')} ({error.get('node_type')}) raised "
                       f"{error.get('exception_type')}: {error.get('exception_message')}")
            else:
                msg = f"prompt {prompt_id} failed: {status.get('messages')}"
            raise PromptExecutionError(msg, entry, error)
        return entry

    def run_prompt(self, prompt: dict, timeout: float = 600.0) -> PromptResult:
        """Queue a prompt, wait for it, and measure it. Raises PromptValidationError/PromptExecutionError."""
        if self.proc is None:
            raise ComfyServerError("server not started")
        reset = reset_peak_rss(self.pid)
        rss_before = read_rss(self.pid)
        prompt_id = self.queue_prompt(prompt)
        entry = self.wait_for(prompt_id, timeout)
        return PromptResult(prompt_id=prompt_id, history=entry, seconds=execution_seconds(entry),
                            peak_rss_bytes=read_peak_rss(self.pid), peak_rss_reset=reset,
                            rss_before_bytes=rss_before, output_files=self.output_files(entry))

    def output_files(self, entry: dict) -> list[str]:
        """Files the output nodes report in the history (images, latents, gifs, ...)."""
        roots = {"output": self.output_dir, "temp": os.path.join(self.temp_dir, "temp"),
                 "input": self.input_dir}
        files = []
        for node_out in (entry.get("outputs") or {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        files.append(os.path.join(root, item.get("subfolder", ""), item["filename"]))
        return files


def execution_seconds(entry: dict) -> Optional[float]:
    stamps = {}
    for event, data in (entry.get("status") or {}).get("messages", []):
        if isinstance(data, dict) and "timestamp" in data:
            stamps[event] = data["timestamp"]
    start = stamps.get("execution_start")
    end = stamps.get("execution_success", stamps.get("execution_error"))
    if start is None or end is None:
        return None
    return (end - start) / 1000.0


def format_validation_error(status: int, payload) -> str:
    if not isinstance(payload, dict):
        return f"POST /prompt answered {status}: {payload}"
    lines = [f"POST /prompt answered {status}"]
    err = payload.get("error")
    if isinstance(err, dict):
        lines[0] += f": {err.get('message', '')} {err.get('details', '')}".rstrip()
    elif err:
        lines[0] += f": {err}"
    for node_id, ne in (payload.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {node_id} ({ne.get('class_type')}): {e.get('message', '')}: "
                         f"{e.get('details', '')}".rstrip(": "))
    return "\n".join(lines)


def newest_file(folder: str, suffix: str = "") -> Optional[str]:
    best = None
    for dirpath, _, names in os.walk(folder):
        for n in names:
            if n.endswith(suffix):
                p = os.path.join(dirpath, n)
                if best is None or os.path.getmtime(p) > os.path.getmtime(best):
                    best = p
    return best
