"""The PostgreSQL database behind one small interface: pool, timeouts, errors, figures.

aiopg 1.4 is the driver (unmaintained: pitfalls §4), so nothing of it leaks past this
package. The pool is our own, on aiopg connections (pool.py says why); a query run often
becomes a server-side prepared statement on each connection (statement.py).

  database.py   Database: queries on the pool, one retry, driver errors mapped to ours
  pool.py       Pool: bounded sessions, FIFO hand-over, watchdog, close with a grace period
  session.py    Session: one aiopg connection driven one round trip at a time
  statement.py  prepared statements: which queries, when, PREPARE and DEALLOCATE
  dsn.py        the DSN libpq gets: statement_timeout, application_name, hostaddr
"""

from __future__ import annotations

from proxy.db.database import Database, Row
from proxy.db.statement import PREPARE_THRESHOLD, compile_statement
from proxy.errors import QueryRejected

__all__ = ["PREPARE_THRESHOLD", "Database", "QueryRejected", "Row", "compile_statement"]
