"""Dashboard pages, one file per page (Dash imports each file that calls ``dash.register_page``)."""
