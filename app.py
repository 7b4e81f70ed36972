"""phpn's app from a checkout: ``streamlit run app.py`` (installed: ``phpn app``)."""
from phpn.app.main import main

main()
