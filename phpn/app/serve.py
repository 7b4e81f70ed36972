"""The app as served: Streamlit's ASGI app (``st.App``) around the entry point, with the
middleware that gives each browser its key as an HttpOnly cookie
(:mod:`phpn.app.serving.browser`). ``phpn app`` runs this file; ``streamlit run serve.py`` is
the same in a checkout. (``streamlit run app.py`` still works: the page then writes the key's
cookie itself, which is not HttpOnly.)"""
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from phpn.app.serving.browser import BrowserKeyMiddleware

app = st.App(str(Path(__file__).with_name("main.py")), middleware=[Middleware(BrowserKeyMiddleware)])
