"""Package set-up: everything is read from settings.ini (nbdev convention)."""
from configparser import ConfigParser
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']
scripts = [s.strip() for s in c.get('console_scripts', '').split() if s.strip()]
setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    author=c['author'], author_email=c['author_email'], license=c['license'],
    packages=setuptools.find_packages(include=['ns_vit', 'ns_vit.*']),
    python_requires='>=' + c['min_python'],
    install_requires=c['requirements'].split(),
    extras_require={'dev': c['dev_requirements'].split()},
    entry_points={'console_scripts': scripts, 'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    include_package_data=True, zip_safe=False,
)
