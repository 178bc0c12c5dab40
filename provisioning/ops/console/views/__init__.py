"""The console's views, one Blueprint per concern: ``auth`` (login, logout), ``pages`` (reading) and
``actions`` (requeue and resend, each a dry run first). Each view is a small module-level function;
what they share is on the app (:func:`provisioning.ops.console.state.console`)."""
