"""Shadow reads: a candidate group asked the reads its clients still send to default, at
default's exact resourceVersion, and the answers compared, before anyone moves."""
