"""phpn's app from a checkout, served with its HttpOnly browser-key cookie: ``streamlit run serve.py``
(see phpn/app/serve.py; ``phpn app`` runs that one once installed)."""
import streamlit as st
from starlette.middleware import Middleware

from phpn.app.serving.browser import BrowserKeyMiddleware

app = st.App("app.py", middleware=[Middleware(BrowserKeyMiddleware)])
