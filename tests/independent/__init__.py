"""A second implementation of the published formats, written from the specifications alone
(RFC 6962/9162, C2SP signed-note, tlog-checkpoint, tlog-cosignature, tlog-witness). It imports
nothing from ``exchange``: the tests check the vectors and the nodes against it."""
