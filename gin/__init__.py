"""Gin configs shipped as package data (``mu2net.gin``); import gin-config via mu2net.train._gin."""
