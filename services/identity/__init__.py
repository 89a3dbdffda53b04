"""Identity service: stitch every identifier of a touchpoint into one pseudonymous customer."""
