"""
Real renders with the real ffmpeg (from the imageio-ffmpeg wheel) over real
sockets: progress streams as the render goes, the MP4 is valid and served
with Range support, and cancelling kills the child.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests._support.waiting import whenTrue
from tests._support.server import ServerMixin, stream

HOSTILE = "It's 100%{pts} \\ done: [a];b,c\n\nevent: complete\ndata: x \u202e\u05e9 \U0001f600 $(id) `id`"


def probe(path: str) -> tuple[int, float]:
    """
    Frame count and duration of a video, as ffmpeg itself reads it back.
    """
    import imageio_ffmpeg

    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path, "-map", "0:v:0",
         "-f", "null", "-progress", "pipe:1", "-nostats", "-"],
        capture_output=True, timeout=60, check=True, text=True,
    )  # fmt: skip
    frames = int(re.findall(r"^frame=(\d+)$", result.stdout, re.M)[-1])
    found = re.search(r"Duration: (\d+):(\d+):([\d.]+)", result.stderr)
    assert found, result.stderr
    h, m, s = found.groups()
    return frames, int(h) * 3600 + int(m) * 60 + float(s)


class FFmpegTests(ServerMixin, TestCase):
    timeout = 120

    @inlineCallbacks
    def test_cardRenderStreamsAndPlays(self) -> None:
        """
        A card render with a hostile title streams many increasing progress
        events while it runs, then C{complete}; the MP4 is valid (ffmpeg
        reads back 4 s and 120 frames) and is served as video/mp4 with Range.
        (720p, long enough that ffmpeg, at 10-20x real time here, prints
        several progress blocks 50 ms apart.)
        """
        self.startServer()
        params = {"title": HOSTILE, "subtitle": "sub'title:%{n}", "duration": 4, "size": "1280x720", "fps": 30}
        job = yield self.post("card", params)
        events, done = stream(self.base + job["events_url"], self.pool)
        yield done
        response, *received = events
        self.assertEqual(response.code, 200)
        names = [e.event for e in received]
        self.assertEqual(names[-1], "complete", received[-1].data)
        progress = [json.loads(e.data) for e in received if e.event == "progress"]
        self.assertGreaterEqual(len(progress), 3, progress)
        percents = [p["percent"] for p in progress]
        self.assertEqual(percents, sorted(percents))
        self.assertLess(percents[0], percents[-1])
        self.assertTrue(all(p["total_frames"] == 120 for p in progress))
        result = json.loads(received[-1].data)
        self.assertEqual(result["output_url"], job["output_url"])
        self.assertEqual(result["duration"], 4.0)

        output = yield treq.get(self.base + job["output_url"], pool=self.pool)
        body = yield treq.content(output)
        self.assertEqual(output.code, 200)
        self.assertEqual(output.headers.getRawHeaders("content-type"), ["video/mp4"])
        self.assertEqual(len(body), result["size"])
        path = self.mktemp() + ".mp4"
        with open(path, "wb") as f:
            f.write(body)
        frames, duration = probe(path)
        self.assertEqual(frames, 120)
        self.assertAlmostEqual(duration, 4.0, delta=0.05)

        ranged = yield treq.get(self.base + job["output_url"], headers={"Range": "bytes=0-99"}, pool=self.pool)
        part = yield treq.content(ranged)
        self.assertEqual((ranged.code, part), (206, body[:100]))
        # Nothing but the output is left in the output directory.
        self.assertEqual(sorted(os.listdir(self.service.outputDir)), [f"{job['id']}.mp4"])

    @inlineCallbacks
    def test_cancelKillsFFmpeg(self) -> None:
        """
        Cancelling a running card render kills ffmpeg, ends the stream with
        C{cancelled}, and leaves no partial output or scratch file.
        """
        self.startServer()
        job = yield self.post("card", {"duration": 60, "size": "1920x1080", "fps": 60})
        events, done = stream(self.base + job["events_url"], self.pool)
        yield whenTrue(reactor, lambda: len(events) >= 3, 20, "3 events")
        response = yield treq.delete(self.base + job["status_url"], pool=self.pool)
        body = yield response.json()
        self.assertEqual(response.code, 202, body)
        yield done
        self.assertEqual(events[-1].event, "cancelled")
        code, status = yield self.getJSON(job["status_url"])
        self.assertEqual(status["state"], "cancelled")
        self.assertEqual(self.service.activeCount(), 0)
        self.assertEqual(os.listdir(self.service.outputDir), [])
        response = yield treq.delete(self.base + job["status_url"], pool=self.pool)
        body: Any = yield response.json()
        self.assertEqual((response.code, body["error"]), (409, "job_finished"))
