-- Run as the PostgreSQL superuser. Use a strong password or certificate authentication in pg_hba.conf.
CREATE ROLE exchange LOGIN;
CREATE DATABASE exchange OWNER exchange;
