"""
The test toolkit: every helper the test trees share, written once. Each
module has one job:

  - L{waiting}: wait for a condition, or read a pipe, with a deadline
    (never unbounded), blocking or on the reactor;
  - L{stats}: one percentile (nearest rank) and the latency summary;
  - L{ports}: a free 127.0.0.1 port;
  - L{chunked}: one HTTP/1.1 chunked-body decoder;
  - L{procfs}: readings from C{/proc} (memory, descriptors, CPU, process
    tree);
  - L{launcher}: a bounded server launcher (start a process, wait for its
    listening line with a deadline, stop it by PID);
  - L{web}: an HTTP/1.1 connection to a real L{Site} over a
    L{StringTransport}, and the transports the unit tests use;
  - L{fixtures}: job and service fixtures for unit tests;
  - L{jsonhttp}: blocking JSON requests and response heads;
  - L{server}: a twistedsse server in the test's reactor (integration);
  - L{frames}: L{frames.FrameReader}, the load clients' fast parser;
  - L{h2client}: a blocking HTTP/2 client over TLS; L{tls}: a self-signed
    identity for it and the server;
  - L{markers}: marking a whole test tree (the slow trees' conftest.py);
  - L{sseclient}: a socket client in a process of its own;
  - L{serve}: the twistedsse server program the browser and load tests
    run in a process of their own.

The test trees (unit, integration, browsers, load) import from here, never
from each other.
"""
